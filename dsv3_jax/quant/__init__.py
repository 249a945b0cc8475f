"""FP8 block quantisation (`fp8`: QuantArray, 128×128 weight blocks, 1×128 activation tiles, FP8 training GEMMs)
and the one matmul wrapper every projection goes through (`matmul.einsum`)."""
