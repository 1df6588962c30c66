from dyvte import flops

T = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16, "intermediate_size": 160,
     "vocab_size": 100}


def test_mha_layer_formula():
    n, d, m = 37, 64, 160
    assert flops.decoder_layer_flops(T, n) == 2 * n * (4 * d * d + 3 * d * m) + 4 * n * n * d


def test_gqa_counts_fewer_kv_flops():
    gqa = dict(T, num_kv_heads=1)
    assert flops.decoder_layer_flops(gqa, 10) < flops.decoder_layer_flops(T, 10)


def test_exit_splits_layers():
    n, v = 100, 80
    full = flops.prefill_flops(T, n, v, 4)
    mid = flops.prefill_flops(T, n, v, 2)
    none = flops.prefill_flops(T, n, v, 0)
    layer = flops.decoder_layer_flops
    assert full - mid == 2 * (layer(T, n) - layer(T, n - v))
    assert none < mid < full
    assert flops.prefill_flops(T, n, v, 4, vision=1e6) == full + 1e6


def test_decode_flops_grow_with_context():
    a = flops.decode_flops(T, 50, 40, 4, 5)
    b = flops.decode_flops(T, 50, 40, 0, 5)
    assert a > b > 0
    assert flops.decode_flops(T, 50, 40, 4, 1) == 0
