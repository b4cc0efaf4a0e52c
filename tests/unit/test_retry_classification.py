"""Which errors a stage retries: transient I/O, network and server errors yes; deterministic ones no."""

import pytest

from tasks.machinery.context import is_transient


@pytest.mark.parametrize("exc, transient", [
    (ConnectionError("reset"), True), (TimeoutError(), True), (OSError(28, "No space left on device"), True),
    (FileNotFoundError("x"), False), (ValueError("bad"), False), (KeyError("k"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_http_5xx_and_mlflow_unavailable_are_transient():
    from botocore.exceptions import ClientError
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                                    "PutObject"))
    assert not is_transient(ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                                        "PutObject"))
    assert is_transient(MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))


def test_a_missing_hub_repo_or_revision_is_permanent():
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/nope"))
    assert not is_transient(RepositoryNotFoundError("404: org/nope", response=response))
    assert not is_transient(RevisionNotFoundError("404: no such revision", response=response))
    try:  # transformers' rewrap, as from_pretrained raises it
        try:
            raise RepositoryNotFoundError("404", response=response)
        except RepositoryNotFoundError as e:
            raise OSError("org/nope is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'") from e
    except OSError as wrapped:
        assert not is_transient(wrapped)
    assert is_transient(OSError("Connection reset by peer"))
