"""Wire-level pieces for object stores (S3, GCS, Azure Blob): re-signing what the proxy
sends to S3 (SigV4), decoding aws-chunked upload bodies, refusals in each SDK's error
format, and the form fields of S3 browser POST uploads. Pure code: no I/O."""

from casb.objectstore.aws_chunked import AwsChunkedDecoder, AwsChunkedError
from casb.objectstore.errors import Style, render_error
from casb.objectstore.form_upload import FormUploadError, PostObjectFields
from casb.objectstore.sigv4 import (
    REPLACED_HEADERS,
    SigningError,
    canonical_path,
    canonical_query,
    sign_s3,
)

__all__ = [
    "REPLACED_HEADERS",
    "AwsChunkedDecoder",
    "AwsChunkedError",
    "FormUploadError",
    "PostObjectFields",
    "SigningError",
    "Style",
    "canonical_path",
    "canonical_query",
    "render_error",
    "sign_s3",
]
