"""The GPU installation, read from its files: the CUDA libraries of the wheels (`cudalibs`), ELF
files (`elffile`), the driver and the GPUs (`gpus`), and `distft doctor`. Nothing here imports
MXNet: it answers where `import mxnet` fails."""
