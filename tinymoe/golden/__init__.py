"""Golden tensors for porters: one case per forward/backward pair, and a conformance runner.

    python -m tinymoe.golden write DIR [--preset toy|bench] [--dtype float64|float32] [--seed S]
    python -m tinymoe.golden verify DIR --impl MODULE [--cases A,B]
                                        [--precision float32|bfloat16|float64]

    cases.py           what each case feeds in (seeded, routing margins) and its tolerance class
    reference.py       tinymoe itself as a port: the calling convention, one function per case
    write.py           case files (safetensors) + manifest.json, deterministic and atomic
    verify.py          runs a port, compares every output tensor, prints the table
    safetensors_io.py  the safetensors format with NumPy + JSON only (no dependency)

Like llm.c's debug state for its CUDA authors (reference/kits.md section 3), but per piece: a
port that fails names the case, the tensor and the first wrong index. Nothing in layers/ or
model.py imports this package.
"""
