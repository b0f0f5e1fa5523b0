"""What a failed product means: out of memory, transient, or an unsupported transform."""

from __future__ import annotations

__all__ = ["is_out_of_memory", "is_transient_error", "is_unsupported_transform_error"]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that the host or a device ran out of memory: MemoryError, an
    ``OutOfMemoryError`` (torch's, CuPy's), or a message with "out of memory" (torch on
    CUDA and MPS) or "RESOURCE_EXHAUSTED" (XLA)."""
    if isinstance(error, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    message = str(error).lower()
    return "out of memory" in message or "resource_exhausted" in message


#: Words in an error's message that mean a device or the host ran out of memory: torch
#: ("CUDA out of memory", "MPS backend out of memory") and XLA ("RESOURCE_EXHAUSTED").
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "resource_exhausted")


#: What torch.func and JAX raise when a function does not support a transform:
#: RuntimeError (torch: ``.item()``, in-place ops, data-dependent control flow, batching
#: rules; NotImplementedError: no forward-mode rule; torch.compile's errors), TypeError
#: (JAX's tracer errors: ConcretizationTypeError, TracerArrayConversionError,
#: TracerBoolConversionError, UnexpectedTracerError; custom_vjp under jvp), IndexError
#: (JAX: slices with traced bounds) and ValueError (vmap: outputs that are not arrays,
#: or vectors where a block is mapped).
_TRANSFORM_ERRORS = (RuntimeError, TypeError, IndexError, ValueError)


def is_transient_error(error: BaseException) -> bool:
    """Whether ``error`` says nothing about the function that raised it.

    True for interrupts and exits (any non-``Exception``, such as KeyboardInterrupt), a
    MemoryError, any ``OutOfMemoryError`` (torch's, CuPy's) and an error whose message
    says the memory ran out (torch's "out of memory", XLA's "RESOURCE_EXHAUSTED"). The
    same call may succeed later, or with a smaller block, so a caller must not trade a
    product route for another on it.
    """
    if not isinstance(error, Exception) or isinstance(error, MemoryError):
        return True
    # by name: torch.OutOfMemoryError is a RuntimeError, and naming it needs no import
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    message = str(error).lower()
    return any(words in message for words in _OUT_OF_MEMORY_MESSAGES)


def is_unsupported_transform_error(error: BaseException) -> bool:
    """Whether ``error`` may mean that the function does not support a transform (vmap,
    jvp, grad, jit), so that a route without it (another mode, a loop) may work.

    True for the error types transforms raise (RuntimeError, TypeError, IndexError,
    ValueError and their subclasses, JAX's tracer errors among them), unless
    :func:`is_transient_error`. Other errors (AssertionError, KeyError, OSError, ...) come
    from the function itself and would come from any route.
    """
    return isinstance(error, _TRANSFORM_ERRORS) and not is_transient_error(error)
