"""Everything that knows a path or a URL: image sources, model roots, result roots.

Every location is an fsspec URL; a plain path is a local folder. S3 endpoints and credentials
come from the usual AWS environment variables / config files, never from code or logs.
"""
