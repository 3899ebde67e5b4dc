"""Links in run artifacts point where a browser reaches the object store (DREAMCACHE_S3_PUBLIC_ENDPOINT_URL)."""

import urllib.request

from flows.platform import resources as platform_module
from flows.runs.run_report import public_link


def test_artifact_links_use_the_public_endpoint(platform_env, s3_bucket, s3_endpoint):
    public = s3_endpoint.replace("127.0.0.1", "localhost")  # the same server, as a browser would name it
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", f"s3://{s3_bucket}/platform")
    platform_env.setenv("DREAMCACHE_S3_PUBLIC_ENDPOINT_URL", public)
    platform_module.close_platforms()
    objects = platform_module.get_platform().objects
    stored = objects.put("shots/sheets/MUG-1.png", b"contact sheet", content_type="image/png")
    url = public_link(stored.uri)
    assert url.startswith(f"{public}/{s3_bucket}/platform/shots/sheets/MUG-1.png?"), url
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"contact sheet"
