"""nemokern: fused RLHF kernels and a minimal Llama-3.1 (layout and layering:
docs/architecture.md)."""

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled pybind11 extension nemokern._C imports."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True
