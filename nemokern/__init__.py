"""nemokern: a custom-kernel performance engine for RLHF of Llama-3.1 models.

Layering (an import may only point down): cli -> train -> data -> model -> parallel -> ops -> kernels.
"""

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled pybind11 extension nemokern._C imports."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True
