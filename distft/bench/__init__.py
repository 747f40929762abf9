"""Benchmarks: `distft bench` (`bench`: distft against a plain Horovod loop, `baseline`, and the
forward-only limit), the synchronized BN exchange (`syncbench`), the linear probe against
scikit-learn (`probebench`), and Horovod's timeline read per step (`timeline`)."""
