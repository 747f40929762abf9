"""Ranks working as one: the Horovod seam (`world`), the gradient exchange and its ballot
(`exchange`), agreement between ranks (`agreement`), and synchronized BatchNorm (`syncbn`, over
the statistics channel `bnchannel` and the ordered exchanges of `bnexchange`)."""
