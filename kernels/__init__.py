"""Triton kernels for the hot paths, each beside its plain-PyTorch reference.

    attention.py      fused attention forward (flash-style online softmax)     attention_ref
    adaln.py          LayerNorm + adaLN modulation; gated residual              *_ref beside each
    guidance_step.py  CFG combine + one sampler step in one elementwise pass   guided_step_ref
    filter.py         cosine score + threshold + compaction indices             cosine_filter_ref
    dispatch.py       the public ops: kernel or reference per call (`use_triton`, `triton_kernels`)

Callers use `synthgen.kernels.dispatch`. Nothing is re-exported here on purpose: a package attribute
`attention` (the op) would shadow the submodule `attention` (the kernel). Nothing launches at import.
"""
