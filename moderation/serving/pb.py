"""triton_python_backend_utils, imported only when a model runs inside a Triton stub (or a test double)."""


def pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils
