"""`distft bench`'s results as Markdown tables (what it prints, and --markdown writes)."""
from __future__ import annotations


def markdown(r: dict) -> str:
    mb = 1024 * 1024
    rows = [
        ("samples/s (all ranks)", *(f"{r['samples_per_sec'][k]:.1f}" for k in ("distft", "baseline", "limit"))),
        ("vs forward-only limit", *(f"{r['samples_per_sec'][k] / r['samples_per_sec']['limit']:.2f}"
                                    for k in ("distft", "baseline", "limit"))),
        ("peak RSS per rank (MiB)", *(f"{r['peak_rss_bytes'][k] / mb:.0f}" for k in ("distft", "baseline", "limit"))),
        ("peak RSS vs the baseline's", f"{r['ratios']['peak_rss_distft_over_baseline']:.2f}", "1.00", "-"),
        *([("MXNet's CPU workspaces (MXNET_CPU_TEMP_COPY)", *(_copies(t[k]) for k in ("distft", "baseline")), "-")]
          if (t := r.get("mxnet_cpu_temp_copy")) else []),
        ("bytes broadcast at start", f"{r['bytes_broadcast']['distft']:,}", f"{r['bytes_broadcast']['baseline']:,}", "-"),
        ("bytes allreduced per step", f"{r['allreduce_bytes_per_step']['distft']:,}",
         f"{r['allreduce_bytes_per_step']['baseline']:,}", "-"),
        ("seconds to first step", f"{r['seconds_to_first_step']['distft']:.1f}",
         f"{r['seconds_to_first_step']['baseline']:.1f}", "-"),
    ]
    if "cache" in r:
        rates = r["cache"]["epoch_samples_per_sec"]
        rows.append(("with the feature cache: samples/s, epochs after the first",
                     f"{r['samples_per_sec']['distft_cached']:.1f} (epoch 0: {rates[0]:.1f})",
                     f"{r['samples_per_sec']['baseline']:.1f}", "-"))
    m = r["machine"]
    head = (f"`{r['model']}` at {r['image_size']}px, trainable {', '.join(r['trainable'])}, "
            f"{r['world_size']} ranks x batch {r['batch_size_per_rank']}, horovodrun --{r['controller']}"
            f"{_run_settings(r)}; "
            f"{m['cores']} cores ({m['cpu'] or 'cpu'}), "
            f"{m['gpus']} GPUs, MXNet {m['mxnet']}. distft/baseline = {r['ratios']['distft_over_baseline']:.2f}, "
            f"distft/limit = {r['ratios']['distft_over_limit']:.2f}"
            + (f", cached epochs/baseline = {r['ratios']['cached_over_baseline']:.1f}" if "cache" in r else "")
            + ".\n\n")
    table = ["| | distft | baseline | limit |", "|---|---:|---:|---:|"] + [f"| {' | '.join(row)} |" for row in rows]
    return head + "\n".join(table) + "\n" + (_sync_bn_lines(r["sync_bn"]) if "sync_bn" in r else "")


def _run_settings(r: dict) -> str:
    """Both runs' Horovod cycle and Open MPI yield, in parentheses ("" for a result without them)."""
    cycle = r.get("horovod_cycle_ms")
    if not cycle or cycle.get("distft") is None:
        return ""
    said = f"Horovod's cycle: distft {cycle['distft']:g} ms, baseline {_ms(cycle['baseline'])} ms"
    y = r.get("mpi_yield_when_idle") or {}
    if y.get("distft") is not None:
        said += f"; OMPI_MCA_mpi_yield_when_idle: distft {y['distft']}, baseline {y['baseline'] or 'unset'}"
    return f" ({said})"


def _copies(value) -> str:
    return "4 (MXNet's default)" if value is None else str(value)


def _ms(value) -> str:
    return "?" if value is None else f"{value:g}"


def _sync_bn_lines(f: dict) -> str:
    names = sorted(f["exchange_us"], key=lambda n: n != f["channel"])  # the job's channel first
    channels = ", ".join(f"{n} {f['exchange_us'][n]:.0f} us" + (" (this job's)" if n == f["channel"] else "")
                         for n in names)
    layers = "; ".join(f"batch {b}: local {v['local']:.0f} us, " + ", ".join(
        f"synchronized over {n} {v[n]:.0f} us" for n in names) for b, v in f["layer_us"].items())
    per_step = f["exchanges_per_step"]
    return (f"\nSynchronized BatchNorm: {f['layers']} layers, statistics over {f['channel']}; "
            f"{per_step.get('forward', 0):.0f} forward + {per_step.get('backward', 0):.0f} backward exchanges per step. "
            f"One exchange ({2 * f['channels'] + 1} values), per channel: {channels}. Floor {f['floor_ms_per_step']:.1f} ms "
            f"per step = {100 * f['floor_fraction_of_baseline_step']:.1f}% of the baseline's step, so distft/baseline "
            f"<= 1 / (1 + {f['floor_fraction_of_baseline_step']:.3f}) = {f['bound_distft_over_baseline']:.2f} while nothing "
            f"else runs during an exchange. One layer forward + backward ({f['channels']} channels, "
            f"{f['spatial']}x{f['spatial']}): {layers}.\n"
            + (_timeline_lines(f["in_training"]) if "in_training" in f else ""))


def _timeline_lines(t: dict) -> str:
    if "error" in t:
        return f"\nInside training (Horovod's timeline): not measured: {t['error']}\n"
    g = t["groups"]
    rows = [(what, g[k]) for what, k in (("synchronized BN, forward", "bn_forward"),
                                         ("synchronized BN, backward", "bn_backward"),
                                         ("gradient buckets", "gradients"))]
    table = ["| per step | operations | negotiating (ms) | transferring (ms) | one operation, median (ms) |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {what} | {v['per_step']:.1f} | {v['negotiate_ms_per_step']:.1f} | {v['transfer_ms_per_step']:.1f} | "
              f"{v['transfer_median_ms']:.2f} |" for what, v in rows]
    return (f"\nInside training (Horovod's timeline, rank 0, one more run, {t['steps']} steps of {t['step_ms']:.0f} ms: "
            f"the timeline itself slows the run, whose step took {t['untraced_step_ms']:.0f} ms untraced. "
            "Negotiating: until every rank has queued it, Horovod's round trip and its thread's other "
            "collectives included; rows overlap, they do not add up to the step):\n\n" + "\n".join(table) + "\n")


# --- a grid: K heads in one run against one head -----------------------------------------------------



def markdown_grid(r: dict) -> str:
    mb = 1024 * 1024
    k, rates = r["heads"], r["samples_per_sec"]
    rows = [
        ("samples/s (all ranks), epochs without the cache", f"{rates['one_head']:.1f}", f"{rates['grid']:.1f}"),
        ("  per repeat", ", ".join(f"{x:.1f}" for x in r["rounds"]["one_head"]),
         ", ".join(f"{x:.1f}" for x in r["rounds"]["grid"])),
        ("head-samples/s (samples/s x heads)", f"{rates['one_head']:.1f}", f"{k * rates['grid']:.1f}"),
        ("peak RSS per rank (MiB)", f"{r['peak_rss_bytes']['one_head'] / mb:.0f}",
         f"{r['peak_rss_bytes']['grid'] / mb:.0f}"),
        ("bytes allreduced per step", f"{r['allreduce_bytes_per_step']['one_head']:,}",
         f"{r['allreduce_bytes_per_step']['grid']:,}"),
        (f"a {k}-point sweep, vs {k} separate runs", "1.00", f"{r['sweep_cost_vs_separate_runs']:.2f}"),
    ]
    if "cache" in r:
        c = r["cache"]
        rows.append(("with the feature cache: samples/s, epochs after the first",
                     f"{c['samples_per_sec']['one_head']:.1f}", f"{c['samples_per_sec']['grid']:.1f}"))
        rows.append((f"  a {k}-point sweep there, vs {k} separate runs", "1.00",
                     f"{c['sweep_cost_vs_separate_runs']:.2f}"))
    m = r["machine"]
    head = (f"`{r['model']}` at {r['image_size']}px, trainable {', '.join(r['trainable'])}, {r['world_size']} ranks x "
            f"batch {r['batch_size_per_rank']}, {r['repeats']} interleaved repeat(s), medians; {m['cores']} cores "
            f"({m['cpu'] or 'cpu'}), {m['gpus']} GPUs, MXNet {m['mxnet']}. {k} heads run at "
            f"{r['grid_over_one_head']:.2f}x the samples/s of one head.\n\n")
    table = ["| | 1 head | " + f"{k} heads |", "|---|---:|---:|"] + [f"| {' | '.join(row)} |" for row in rows]
    return head + "\n".join(table) + "\n"
