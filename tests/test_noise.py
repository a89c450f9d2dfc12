"""The counter-based noise: the CPU fast path equals the int64 reference bit for bit."""


def test_the_cpu_hash_is_the_int64_reference_bit_for_bit():
    import numpy as np
    import torch

    from synthgen.noise import _hash, _hash_int64

    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.randint(0, 2**62, (64,), generator=g), torch.tensor([0, 1, 2**63 - 1, 2**32 - 1])])
    counters = torch.arange(3000, dtype=torch.int64)
    for stream in (0, 1, 7, (1 << 20) + 1, 2**33 + 5):
        assert np.array_equal(_hash(seeds, stream, counters).numpy(), _hash_int64(seeds, stream, counters).numpy())
