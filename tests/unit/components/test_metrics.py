"""Metrics proven against the real tools: promtool, a Prometheus server scraping a 2-rank job,
a Pushgateway, and the Grafana dashboard checked against what the exporter serves."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from distft.config import MetricsConfig
from distft.distributed.world import LocalWorld
from distft.errors import ConfigError
from distft.components.metrics import Metrics

from conftest import MPI_ENV, ROOT, horovodrun, read_summary, run_cli, small_config, write_config


def free_ports(n, start=20000):
    """n consecutive free loopback ports."""
    for base in range(start, 60000, 16):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_http(url, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return get(url)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def fed_exporter(tmp_path, port):
    m = Metrics(MetricsConfig(port=port, bind="127.0.0.1", report=False), LocalWorld(), str(tmp_path), 1)
    m.start()
    m.startup({"trainable_params": 10, "frozen_params": 100}, 1234, forward_rate=500.0)
    for step in range(1, 4):
        m.step(samples=8, seconds=0.01, data=0.001, allreduce=0.002, allreduce_bytes=40, loss=1.0 / step,
               lr=0.1, epoch=0)
        m.window(global_step=step, total_steps=3, epoch=0, loss=1.0 / step, lr=0.1)
    m.evaluation({"val_top1": 0.5, "val_top5": 0.9, "val_loss": 1.0}, 0)
    return m


def test_promtool_accepts_what_a_rank_serves(tmp_path):
    port = free_ports(1)
    m = fed_exporter(tmp_path, port)
    try:
        text = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        m.close()
    assert 'distft_samples_total{host="' in text and 'rank="0"' in text
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def status_and_body(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_healthz_is_200_while_steps_finish_and_503_after_stall_timeout(tmp_path):
    port = free_ports(1)
    m = Metrics(MetricsConfig(port=port, bind="127.0.0.1", report=False), LocalWorld(), str(tmp_path), 1,
                stall_timeout=1.5)
    m.start()
    base = f"http://127.0.0.1:{port}"

    def step():
        m.step(samples=8, seconds=0.01, data=0.0, allreduce=0.0, allreduce_bytes=0, loss=1.0, lr=0.1, epoch=0)

    try:
        assert status_and_body(f"{base}/healthz")[0] == 200  # starting up
        step()
        code, body = status_and_body(f"{base}/healthz")
        assert code == 200 and body.startswith("ok")
        time.sleep(2.0)
        code, body = status_and_body(f"{base}/healthz")
        assert code == 503 and "train.stall_timeout 1.5 s" in body
        step()
        assert status_and_body(f"{base}/healthz")[0] == 200
        # every other path is the exporter, as before
        for path in ("/metrics", "/", "/anything"):
            code, body = status_and_body(base + path)
            assert code == 200 and 'distft_steps_total{host="' in body, path
    finally:
        m.close()
    with pytest.raises(OSError):  # closed: the port is free again
        get(f"{base}/healthz", timeout=2)


def test_port_in_use_is_an_error_or_the_next_free_port(tmp_path):
    port = free_ports(2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        m = Metrics(MetricsConfig(port=port, bind="127.0.0.1"), LocalWorld(), str(tmp_path), 1)
        with pytest.raises(ConfigError, match=rf"metrics.port: cannot serve metrics on 127.0.0.1:{port}"):
            m.start()
        m = Metrics(MetricsConfig(port=port, bind="127.0.0.1", on_port_in_use="next"), LocalWorld(), str(tmp_path), 1)
        m.start()
        assert m.port == port + 1
        m.close()
    finally:
        blocker.close()


def test_grafana_dashboard_uses_only_served_metric_names(tmp_path):
    port = free_ports(1)
    m = fed_exporter(tmp_path, port)
    try:
        served = set(re.findall(r"^(distft_\w+)", get(f"http://127.0.0.1:{port}/metrics"), re.M))
    finally:
        m.close()
    dash = json.load(open(os.path.join(ROOT, "k8s", "grafana-dashboard.json")))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["query"])
    used = {name for e in exprs for name in re.findall(r"\b(distft_\w+)", e)}
    assert used and used <= served, used - served


def test_report_and_json_lines_log(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, data={"val": "demo"}, train={"max_steps": 6, "log_every": 2},
                       metrics={"port": 0, "report": True})
    proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    with open(out / "report.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r["step"] for r in lines if "step" in r and "event" not in r]
    assert steps == [2, 4, 6]
    assert any(r.get("event") == "eval" and 0 <= r["val_top1"] <= 1 for r in lines)
    s = read_summary(out)
    assert s["forward_only_samples_per_sec_per_rank"] > 0 and 0 < s["throughput_vs_forward_only"]


def promql(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    doc = json.loads(get(url))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.horovod
def test_real_prometheus_scrapes_both_ranks_and_job_figure_is_their_sum(tmp_path, pretrained):
    exporter, prom_port = free_ports(2), free_ports(1, start=40000)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
        "scrape_configs:\n"
        "  - job_name: distft\n"
        "    honor_labels: true\n"  # keep distft's own job label (as the PodMonitor does)
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter}', '127.0.0.1:{exporter + 1}']}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = None
    try:
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
        doc = small_config(tmp_path, pretrained, data={"batch_size": 16}, train={"epochs": 2, "max_steps": 40, "log_every": 5},
                           metrics={"port": exporter, "bind": "127.0.0.1", "linger_seconds": 12, "job": "promtest"})
        cfg = write_config(tmp_path / "c.yaml", doc)
        job = subprocess.Popen(horovodrun(2, "gloo") + [sys.executable, "-m", "distft", "--config", cfg], cwd=ROOT,
                               env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # wait until both ranks have finished training (they linger, serving the final figures)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = promql(prom_port, 'distft_steps_total{job="promtest"} >= 40')
            if len(done) == 2:
                break
            assert job.poll() is None, job.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("Prometheus never saw both ranks finish")
        time.sleep(2.5)  # a scrape of the final values
        per_rank = promql(prom_port, 'distft_samples_per_second{job="promtest"}')
        assert sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"]
        job_rate = promql(prom_port, 'distft_job_samples_per_second{job="promtest"}')
        assert len(job_rate) == 1 and job_rate[0]["metric"]["rank"] == "0"
        total = sum(float(r["value"][1]) for r in per_rank)
        assert float(job_rate[0]["value"][1]) == pytest.approx(total, rel=0.01)
        assert total > 0
        assert job.wait(timeout=60) == 0
    finally:
        for p in (job, prom):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_pushgateway_holds_the_final_figures(tmp_path, pretrained):
    port = free_ports(1, start=45000)
    gw = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        doc = small_config(tmp_path, pretrained, train={"max_steps": 4},
                           metrics={"port": 0, "pushgateway": f"http://127.0.0.1:{port}", "job": "pushtest"})
        proc = run_cli(["--config", write_config(tmp_path / "c.yaml", doc)])
        assert proc.returncode == 0, proc.stderr
        text = get(f"http://127.0.0.1:{port}/metrics")
        line = next(l for l in text.splitlines() if l.startswith("distft_samples_total{") and 'job="pushtest"' in l)
        assert 'rank="0"' in line and float(line.rsplit(" ", 1)[1]) == 4 * 8
    finally:
        gw.kill()
        gw.wait()


def test_top5_of_five_classes_or_fewer_is_not_served(tmp_path):
    from prometheus_client import generate_latest

    m = Metrics(MetricsConfig(port=0, report=False), LocalWorld(), str(tmp_path), 1)
    m.evaluation({"val_top1": 0.5, "val_top5": None, "val_loss": 1.0}, 0)
    text = generate_latest(m.registry).decode()
    assert re.search(r"^distft_validation_top1_ratio\{.*\} 0\.5$", text, re.M)
    assert not re.search(r"^distft_validation_top5_ratio\{", text, re.M)
    m.evaluation({"val_top1": 0.5, "val_top5": 0.75, "val_loss": 1.0}, 1)
    assert re.search(r"^distft_validation_top5_ratio\{.*\} 0\.75$", generate_latest(m.registry).decode(), re.M)


def test_data_wait_share_is_served_logged_and_warned_about_once_over_a_fifth(tmp_path, capsys):
    """A loader-bound run says so: the share of step time spent waiting for data is a gauge, in
    each log window's record, and one warning line the first time it passes 20%."""
    from prometheus_client import generate_latest

    m = Metrics(MetricsConfig(port=0, report=False), LocalWorld(), str(tmp_path), 1)
    m.startup({"trainable_params": 10, "frozen_params": 100}, 0, forward_rate=None)
    for step, wait in enumerate((0.01, 0.06, 0.09, 0.03), 1):  # of 0.1 s steps + the wait
        m.step(samples=8, seconds=0.1, data=wait, allreduce=0.0, allreduce_bytes=0, loss=1.0, lr=0.1, epoch=0)
        record = m.window(global_step=step, total_steps=4, epoch=0, loss=1.0, lr=0.1)
        assert record["data_wait_share"] == pytest.approx(wait / (0.1 + wait))
        if step == 2:
            text = generate_latest(m.registry).decode()
            assert re.search(r"^distft_data_wait_ratio\{.*\} 0\.375$", text, re.M)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "waited for data" in line]
    assert len(warnings) == 1 and "38%" in warnings[0] and "data.workers" in warnings[0]


def test_report_numbers_epochs_as_the_logs_do(tmp_path, monkeypatch):
    """report.png's validation curve: epoch 0 is the first, as in `epoch 0 val top1 ...`."""
    import matplotlib.axes

    from distft.components import metrics

    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *args, **kw: drawn.append((ax, args))
                        or plot(ax, *args, **kw))
    history = [{"step": s, "loss": 1.0, "samples_per_sec": 10.0, "rank_step_seconds": [0.1]} for s in (2, 4)]
    summary = {"val_history": [{"epoch": 0, "val_top1": 0.4}, {"epoch": 1, "val_top1": 0.6}], "model": "m",
               "world_size": 1, "samples_per_sec": 10.0, "val_top1": 0.6}
    metrics.write_report(str(tmp_path / "report.png"), history, summary)
    (val,) = [args for ax, args in drawn if ax.get_title() == "validation top-1"]
    assert list(val[0]) == [0, 1] and list(val[1]) == [0.4, 0.6]


def test_a_relaunch_counts_its_restarts_by_reason_and_logs_where_it_resumed(tmp_path):
    from prometheus_client import generate_latest

    from distft.components.summary import run_history

    m = Metrics(MetricsConfig(port=0, report=False), LocalWorld(), str(tmp_path), 1)
    m.start()
    m.restarted({"n": 3, "reason": "node_lost", "hosts": "node1:2,node3:2", "world_size": 4,
                 "counts": {"node_lost": 2, "stall": 1}}, at_step=15)
    text = generate_latest(m.registry).decode()
    assert re.search(r'^distft_restarts_total\{.*reason="node_lost".*\} 2\.0$', text, re.M)
    assert re.search(r'^distft_restarts_total\{.*reason="stall".*\} 1\.0$', text, re.M)
    m.close()
    assert run_history(str(tmp_path / "log.jsonl"))["restarts"] == [
        {"at_step": 15, "reason": "node_lost", "hosts": ["node1:2", "node3:2"], "world_size": 1}]
