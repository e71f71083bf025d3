"""Shared by the Python-backend pipeline models (copied beside their model.py; the stub puts that folder on
sys.path): BLS calls to the other models, and the errors a pipeline answers with.

A model a pipeline calls can be briefly down: its Python-backend process died ("Stub process '<instance>' is not
healthy."), or dq-serve is unloading and loading it again ("... is not ready", "... has no available versions").
Such a failure is answered with Triton's UNAVAILABLE code (HTTP 503, gRPC UNAVAILABLE) and a message that says to
retry, so clients can tell it from a bad request; everything else stays an ordinary error naming the model.
"""
import triton_python_backend_utils as pb_utils

TRANSIENT = ("is not healthy", "is not ready", "has no available versions", "health mutex")


class RequestError(ValueError):
    """A request that cannot be served; its message goes back to the client."""


class Unavailable(RequestError):
    """A model this pipeline calls is down for now; the client should retry."""


def call(model, inputs, output_names):
    """One BLS request: numpy outputs in the order asked, or RequestError / Unavailable naming `model`."""
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=output_names).exec()
    if response.has_error():
        message = response.error().message()
        if any(needle in message for needle in TRANSIENT):
            raise Unavailable(f"model '{model}' is unavailable ({message}); the server is recovering it: retry")
        raise RequestError(f"model '{model}' failed: {message}")
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names]


def error_response(err):
    """The response for a RequestError: UNAVAILABLE for Unavailable (where this Triton has error codes)."""
    code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
    if isinstance(err, Unavailable) and code is not None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
