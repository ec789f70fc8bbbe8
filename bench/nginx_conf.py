"""nginx configurations for the benchmark: the fake upstream, and the reference proxy."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# The JSON the fake upstream answers every plain POST with (a small chat completion).
UPSTREAM_ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"memproxy-demo",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)

_COMMON = """\
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}-error.log warn;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/{name}-body;
    proxy_temp_path {prefix}/{name}-proxy;
    fastcgi_temp_path {prefix}/{name}-fastcgi;
    uwsgi_temp_path {prefix}/{name}-uwsgi;
    scgi_temp_path {prefix}/{name}-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 0;
{body}
}}
"""


def upstream_conf(prefix: Path, port: int, slow_port: int, workers: int = 1) -> str:
    """nginx as the fake upstream.

    The plain POST is answered by nginx itself (``return``), with the
    ``x-sm-user-id`` and ``User-Agent`` it received echoed back; ``/sse`` and
    ``/upload`` go to the Python server on ``slow_port`` unbuffered.
    """
    body = f"""\
    upstream slow {{
        server 127.0.0.1:{slow_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /sse {{
            proxy_pass http://slow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
        location /upload {{
            proxy_pass http://slow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
        location / {{
            default_type application/json;
            add_header x-echo-user-id $http_x_sm_user_id always;
            add_header x-echo-ua $http_user_agent always;
            return 200 '{UPSTREAM_ANSWER}';
        }}
    }}"""
    return _COMMON.format(workers=workers, prefix=prefix, name="upstream", body=body)


def nginx_regex(pattern: str) -> str:
    """A memproxy ``header_patterns`` regex as a quoted, case-insensitive nginx ``map`` key."""
    if re.search(r'["\\]', pattern.replace("\\/", "")):
        raise ValueError(f"pattern {pattern!r} needs escaping this generator does not do")
    return f'"~*{pattern}"'


def proxy_conf(
    prefix: Path,
    port: int,
    upstream_port: int,
    user_agent_rules: Sequence[tuple[str, str]],
    default_user_id: str,
    workers: int = 1,
) -> str:
    """nginx as the reference proxy: a ``map`` on User-Agent sets ``x-sm-user-id``.

    ``user_agent_rules`` are (regex, user id) pairs in memproxy's order; nginx
    also takes the first regex that matches, case-insensitively.
    """
    rules = "\n".join(f"        {nginx_regex(p)} {uid};" for p, uid in user_agent_rules)
    body = f"""\
    map $http_user_agent $memory_user_id {{
        default {default_user_id};
{rules}
    }}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header x-sm-user-id $memory_user_id;
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}"""
    return _COMMON.format(workers=workers, prefix=prefix, name="proxy", body=body)
