"""Conditional writes of one small object on S3 and GCS: create only if absent, replace only if unchanged.

Beam's FileSystems has no conditional writes, so the lock uses the stores' own
clients for them (boto3, which Beam's S3 file system uses, configured from the
same S3 options; google-cloud-storage, which apache-beam[gcp] installs). Every
other read and write of the work directory goes through FileSystems.
"""
from __future__ import annotations

SCHEMES = ("s3", "gs")


class Unavailable(Exception):
    """The store's client cannot be made here (not installed, or no credentials or project)."""


def _split(path: str) -> tuple[str, str, str]:
    scheme, rest = path.split("://", 1)
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key


def _s3_client(options):
    from apache_beam.options.pipeline_options import PipelineOptions, S3Options
    try:
        import boto3
    except ImportError as exc:
        raise Unavailable(f"boto3 is not installed ({exc})") from exc
    s3 = (options or PipelineOptions([])).view_as(S3Options)
    return boto3.session.Session().client(
        "s3", region_name=s3.s3_region_name, endpoint_url=s3.s3_endpoint_url, use_ssl=not s3.s3_disable_ssl,
        verify=s3.s3_verify, aws_access_key_id=s3.s3_access_key_id, aws_secret_access_key=s3.s3_secret_access_key,
        aws_session_token=s3.s3_session_token)


def _gcs_bucket(bucket: str, options):
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    try:
        from google.cloud import storage
        project = (options or PipelineOptions([])).view_as(GoogleCloudOptions).project
        return storage.Client(project=project).bucket(bucket)
    except Exception as exc:   # not installed, no credentials, no project
        raise Unavailable(f"no Cloud Storage client ({exc})") from exc


def version(path: str, options=None):
    """The object's current version (S3 ETag, GCS generation), or None when it does not exist."""
    scheme, bucket, key = _split(path)
    if scheme == "s3":
        from botocore.exceptions import ClientError
        try:
            return _s3_client(options).head_object(Bucket=bucket, Key=key)["ETag"]
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
    blob = _gcs_bucket(bucket, options).get_blob(key)
    return None if blob is None else blob.generation


def put_if(path: str, payload: bytes, expected, options=None) -> bool:
    """Write `payload` only if the object is absent (`expected` None) or still at version `expected`;
    False when another writer changed it first."""
    scheme, bucket, key = _split(path)
    if scheme == "s3":
        from botocore.exceptions import ClientError
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            _s3_client(options).put_object(Bucket=bucket, Key=key, Body=payload, **condition)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise
        return True
    from google.api_core.exceptions import PreconditionFailed
    try:
        _gcs_bucket(bucket, options).blob(key).upload_from_string(payload,
                                                         if_generation_match=0 if expected is None else expected)
    except PreconditionFailed:
        return False
    return True
