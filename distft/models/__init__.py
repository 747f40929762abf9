"""Models: the Gluon seam (`gluon`: the only module that reads Gluon's private fields), the
network built, checked, loaded and run as frozen prefix + trainable suffix (`network`), the
model zoo's weights (`zoo`), input sizes (`inputsize`) and the freeze plan (`freeze`, over the
plain-data `spec`)."""
