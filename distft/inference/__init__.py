"""A finished run put to use: `trained` reads it back; `distft eval` (`evaluate`), `predict`
and `export` start from it."""
