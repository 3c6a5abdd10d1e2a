"""The optional C accelerator of the change stream (everything else is in pyproject.toml).

``shards/postgres/_pgoutput_fast.c`` is built when a C compiler and Python's headers are
there; ``optional=True`` lets the install go on without it (the pure-Python decoder then
runs: shards/postgres/_accel.py, docs/architecture.md "Performance: the applier").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shards.postgres._pgoutput_fast",
            sources=["shards/postgres/_pgoutput_fast.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ],
)
