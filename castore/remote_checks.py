"""What a remote URL may be (no credentials in it, a bucket where the scheme needs one),
and a storage backend's exception as one line saying what to check: both before any
backend is imported (matched by class name)."""

from __future__ import annotations

from castore.errors import ConfigError, RemoteUnavailable


def check_url(url: str) -> str:
    """Refuse URLs that carry credentials (they would end up in config.yaml and logs) and
    object-store URLs without a bucket (no key under them is valid)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password or (parts.username and parts.scheme not in ("", "file")):
        raise ConfigError(
            f"remote URL {parts.scheme}://…@{parts.hostname} carries credentials; give "
            "them through the environment or fsspec's configuration instead"
        )
    if parts.scheme in _BUCKETED and not parts.netloc:
        raise ConfigError(
            f"remote URL {url!r} names no bucket: give {parts.scheme}://BUCKET[/prefix]"
        )
    return url


# Object stores whose URLs start with a bucket (or container): without one no key is valid.
_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "r2"}


_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionRefusedError",
    "ConnectionResetError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


def explain_remote_error(error: BaseException) -> RemoteUnavailable | None:
    """A backend's exception (botocore, aiohttp, gcsfs...; matched by class name, so no
    backend is imported) as one line saying what to check; None when it is not one."""
    seen: BaseException | None = error
    while seen is not None:
        name = type(seen).__name__
        code = str(getattr(seen, "response", {}).get("Error", {}).get("Code", ""))
        text = str(seen).splitlines()[0][:200] if str(seen) else name
        if name in _UNREACHABLE:
            return RemoteUnavailable(
                f"cannot reach the remote ({text}); check its endpoint (FSSPEC_S3_ENDPOINT_URL "
                "or AWS_ENDPOINT_URL for S3-compatible servers) and the network"
            )
        if name in _NO_CREDENTIALS:
            return RemoteUnavailable(
                f"no credentials for the remote ({text}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or fsspec's configuration"
            )
        if name == "ProfileNotFound":
            return RemoteUnavailable(f"{text}; check AWS_PROFILE and the profiles in ~/.aws/config")
        if name in _DENIED or code in _DENIED:
            return RemoteUnavailable(
                f"the remote denied access ({text}); check that the credentials are the right "
                "ones and may read and write that bucket or folder"
            )
        seen = seen.__cause__ or seen.__context__
    return None
