"""The input pipeline: decoding (`imaging`), data sets (`datasets`, `recordio`, `demo`), a
job's sets and classes (`sets`, `classes`), sharding, transforms and the batch loader, the
check of every file (`check`), `make-rec`, and the preprocessing a trained network expects."""
