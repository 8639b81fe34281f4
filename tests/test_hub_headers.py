"""`quantkit inspect HUB_ID` fetches config, tokenizer and index files and only the safetensors headers (HTTP range
reads), checked against a local HTTP server with Range support (the tests have no network)."""

import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from quantkit.errors import CheckpointError
from quantkit.formats.hub import header_only_snapshot, read_remote_safetensors_header
from quantkit.formats.inspect import inspect_path
from quantkit.testing import make_random_checkpoint


class RangeServer:
    """Serves a directory over HTTP with single byte ranges (206 + Content-Range), or ignoring them (200) when
    `ranges` is off; records the ranges asked for and the body bytes sent."""

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges, self.requests, self.sent = root, ranges, [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                server.requests.append((self.path, self.headers.get("Range")))
                if match and server.ranges:
                    start, end = int(match[1]), min(int(match[2]), len(data) - 1)
                    body = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    server.sent += len(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("hub") / "m", shards=2, hidden=256, intermediate=512,
                                  heads=4, kv_heads=2)


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("probe", [64 * 1024, 100], ids=["one-read", "two-reads"])
def test_range_reader_reads_only_the_header(model, probe):
    shard = model / "model-00001-of-00002.safetensors"
    with RangeServer(model) as server:
        head, total = read_remote_safetensors_header(f"{server.url}/{shard.name}", probe=probe)
    assert head == shard.read_bytes()[:_header_len(shard)] and total == shard.stat().st_size
    assert server.sent < 64 * 1024 + 100 < total // 4
    assert [r for _, r in server.requests][0] == f"bytes=0-{probe - 1}"
    assert len(server.requests) == (1 if probe > _header_len(shard) else 2)


def test_a_server_without_ranges_is_read_only_as_far_as_the_header(model):
    shard = model / "model-00002-of-00002.safetensors"
    with RangeServer(model, ranges=False) as server:
        head, total = read_remote_safetensors_header(f"{server.url}/{shard.name}", probe=100)
    assert head == shard.read_bytes()[:_header_len(shard)] and total == shard.stat().st_size


def test_bad_remote_files_are_named(model, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with RangeServer(tmp_path) as server:
        with pytest.raises(CheckpointError, match="bad.safetensors: corrupt safetensors header .claims 1000000000"):
            read_remote_safetensors_header(f"{server.url}/bad.safetensors")
        with pytest.raises(CheckpointError, match="nope.safetensors: HTTP 404"):
            read_remote_safetensors_header(f"{server.url}/nope.safetensors")


def test_inspect_of_a_header_only_snapshot_equals_the_local_one(model, tmp_path):
    files = sorted(p.name for p in model.iterdir())
    with RangeServer(model) as server:
        stub = header_only_snapshot(files, tmp_path / "stub", fetch=lambda name: model / name,
                                    url_of=lambda name: f"{server.url}/{name}")
    weights = sum((model / f).stat().st_size for f in files if f.endswith(".safetensors"))
    assert server.sent < weights // 10  # headers only
    local, remote = inspect_path(model).to_dict(), inspect_path(stub).to_dict()
    for key in ("parameters", "dtypes", "tensor_bytes", "files", "total_file_bytes", "config", "checks", "layout"):
        assert remote[key] == local[key], key
    assert sum(p.stat().st_blocks * 512 for p in stub.glob("*.safetensors")) < weights  # sparse stubs


def test_inspect_hub_id_goes_through_huggingface_hub_urls(model, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from quantkit.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # "org/model" must not exist as a local path
    with RangeServer(model) as server:
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                            lambda self, repo_id, revision=None: sorted(p.name for p in model.iterdir()))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                            lambda repo_id, name, revision=None: str(shutil.copy(model / name, tmp_path / name)))
        monkeypatch.setattr(huggingface_hub, "hf_hub_url",
                            lambda repo_id, name, revision=None: f"{server.url}/{name}")
        main(["inspect", "org/model", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == "org/model" and "no weights" in info["fetched"]
    assert info["parameters"] == inspect_path(model).to_dict()["parameters"]
    assert all(r is not None and r.startswith("bytes=0-") for p, r in server.requests)  # only header reads
    assert not list(tmp_path.glob("*.safetensors"))  # no weight file was downloaded
