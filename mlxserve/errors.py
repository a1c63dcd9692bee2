"""The whole exception tree of mlxserve, in one place.

Every error a request can meet is one of these; ``mlxserve.http`` maps each class to an HTTP
status through its ``status`` attribute, so no handler invents its own codes.

    MlxserveError                      500  (never raised for bad input)
    ├── BadRequest                     400  malformed JSON, wrong field types, bad options
    │   ├── InvalidName                400  a model name that could escape the store
    │   ├── ModelfileError             400  a Modelfile that does not parse (carries a line number)
    │   └── DigestMismatch             400  an uploaded blob whose bytes do not match its digest
    ├── Unauthorized                   401  no API key, or a wrong one (MLXSERVE_API_KEYS)
    ├── NotFound                       404
    │   ├── ModelNotFound              404  "model 'x' not found"
    │   ├── BlobNotFound               404
    │   └── RemoteNotFound             404  a name or tag the registry does not have
    ├── Conflict                       409  the request contradicts the store's state
    ├── IntegrityError                 409  a stored blob is missing, truncated or altered
    ├── PayloadTooLarge                413  a body over the configured limit
    ├── Unprocessable                  422  well-formed but impossible (prompt over the window)
    ├── RegistryError                  502  a registry unreachable, failing or sending bad data
    │   ├── RegistryDigestMismatch     502  a pulled blob whose bytes do not match its digest
    │   └── RegistryUnauthorized       401  the registry refused our credentials
    ├── TransferCancelled              499  a pull/push whose client went away
    ├── ServerBusy                     503  the queue is full; carries retry_after seconds
    ├── ShuttingDown                   503  the daemon is stopping
    └── EngineError                    500  the model crashed while serving; the request is failed
        └── LoadError                  500  the model could not be loaded
            └── UnsupportedModel       422  a stored model of an architecture the engine has no loader for
"""

from __future__ import annotations


class MlxserveError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str = "", **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


class BadRequest(MlxserveError):
    status = 400
    kind = "invalid_request_error"


class InvalidName(BadRequest):
    pass


class ModelfileError(BadRequest):
    def __init__(self, message: str, line: int | None = None):
        if line is not None:
            message = f"line {line}: {message}"
        super().__init__(message)
        self.line = line


class DigestMismatch(BadRequest):
    pass


class Unauthorized(MlxserveError):
    status = 401
    kind = "invalid_request_error"  # OpenAI's type for a missing or wrong key


class NotFound(MlxserveError):
    status = 404
    kind = "not_found_error"


class ModelNotFound(NotFound):
    def __init__(self, name: str):
        super().__init__(f"model '{name}' not found")
        self.name = name


class BlobNotFound(NotFound):
    pass


class Conflict(MlxserveError):
    status = 409
    kind = "conflict_error"


class IntegrityError(MlxserveError):
    status = 409
    kind = "integrity_error"


class PayloadTooLarge(MlxserveError):
    status = 413
    kind = "invalid_request_error"


class Unprocessable(MlxserveError):
    status = 422
    kind = "invalid_request_error"


class ServerBusy(MlxserveError):
    status = 503
    kind = "server_busy"

    def __init__(self, message: str = "server busy, please retry", retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ServerBusy):
    def __init__(self, message: str = "server is shutting down"):
        super().__init__(message, retry_after=5)


class EngineError(MlxserveError):
    status = 500
    kind = "server_error"


class LoadError(EngineError):
    pass


class UnsupportedModel(LoadError):
    # The model, not the server, is at fault: a client error that retrying cannot cure.
    status = 422
    kind = "invalid_request_error"


class RegistryError(MlxserveError):
    status = 502
    kind = "registry_error"


class RegistryDigestMismatch(RegistryError):
    pass


class RegistryUnauthorized(RegistryError):
    status = 401
    kind = "authentication_error"


class TransferCancelled(MlxserveError):
    status = 499
    kind = "cancelled"

    def __init__(self, message: str = "transfer cancelled"):
        super().__init__(message)


class RemoteNotFound(NotFound):
    pass
