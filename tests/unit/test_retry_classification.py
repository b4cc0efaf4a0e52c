"""Which errors a stage retries: transient I/O, network and server errors yes; deterministic ones no."""

import pytest

from tasks.stage import is_transient


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
