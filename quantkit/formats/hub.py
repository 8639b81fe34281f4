"""A header-only snapshot of a Hugging Face hub repository, for `quantkit inspect HUB_ID`.

Inspecting a checkpoint needs its config, tokenizer, index and safetensors headers, never its weights. For a hub
id, `header_only_snapshot` fetches the small files whole (config.json, tokenizer files, the index, ...) and, for
each .safetensors file, only its first 8 + N bytes with HTTP range requests (`read_remote_safetensors_header`:
the little-endian length N, then the JSON header). Each weight file is recreated as a sparse file of its real size
holding the real header, so the checkpoint readers (which check that the header's byte ranges fill the file)
open it as they open a local download, and the sizes reported are the real ones, while a 14 GB model costs a few
hundred kilobytes of transfer. The stub directory is temporary: nothing reads tensor data from it.
"""

from __future__ import annotations

import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from quantkit.errors import CheckpointError

# what `inspect` reads besides the safetensors headers (top-level files only)
SMALL_FILES = ("config.json", "params.json", "generation_config.json", "model.safetensors.index.json",
               "quantize_config.json", "quant_config.json", "tokenizer.model", "tokenizer.model.v1",
               "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json")
PROBE_BYTES = 64 * 1024  # the first range read: the length prefix and, for most models, the whole header
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit


def _content_total(response, url: str) -> int:
    """The file's total size from a 206's Content-Range ("bytes 0-65535/12345678") or a 200's Content-Length."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
    else:
        total = response.headers.get("Content-Length", "")
    if not total.isdigit():
        raise CheckpointError(f"{url}: the server did not say how large the file is (no Content-Range or "
                              "Content-Length); cannot read its safetensors header alone")
    return int(total)


def _open_range(url: str, start: int, end: int, headers: dict[str, str], timeout: float):
    request = urllib.request.Request(url, headers={**headers, "Range": f"bytes={start}-{end}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (an https hub URL or a test server)
    except urllib.error.HTTPError as e:
        hint = " (a gated or private repository: log in with `hf auth login` or set HF_TOKEN)" \
            if e.code in (401, 403) else ""
        raise CheckpointError(f"{url}: HTTP {e.code} {e.reason} reading bytes {start}-{end}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(f"{url}: cannot be reached ({getattr(e, 'reason', e)})") from None


def read_remote_safetensors_header(url: str, headers: dict[str, str] | None = None, timeout: float = 60.0,
                                   probe: int = PROBE_BYTES) -> tuple[bytes, int]:
    """(the first 8 + N bytes of the safetensors file at `url`: its length prefix and JSON header, the file's
    total size), read with HTTP range requests: one of `probe` bytes, and a second one for the rest of a longer
    header. A server that ignores Range (200) is read only as far as the header, then the connection is closed.
    The header is not parsed here; the checkpoint reader checks it as it checks a local file."""
    headers = dict(headers or {})
    with _open_range(url, 0, probe - 1, headers, timeout) as response:
        total = _content_total(response, url)
        data = response.read(min(probe, total))
        if len(data) < 8:
            raise CheckpointError(f"{url}: truncated safetensors file ({total} bytes, no header)")
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(total - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{url}: corrupt safetensors header (claims {n} header bytes, file has {total})")
        if len(data) < 8 + n and response.status != 206:  # no range support: read on, as far as the header
            data += response.read(8 + n - len(data))
    if len(data) < 8 + n:
        with _open_range(url, len(data), 8 + n - 1, headers, timeout) as response:
            if response.status != 206:
                raise CheckpointError(f"{url}: the server ignored the byte range of the header's tail")
            data += response.read(8 + n - len(data))
    if len(data) < 8 + n:
        raise CheckpointError(f"{url}: the header ended early ({len(data)} of {8 + n} bytes)")
    return bytes(data[:8 + n]), total


def write_header_stub(path: Path, head: bytes, total: int) -> None:
    """A sparse file of `total` bytes that starts with `head` (a safetensors length prefix and header)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(total)


def header_only_snapshot(files: Iterable[str], dest: Path, fetch: Callable[[str], str | Path],
                         url_of: Callable[[str], str], headers: dict[str, str] | None = None) -> Path:
    """Fill `dest` with what `inspect` reads of a repository holding `files`: each of SMALL_FILES present, whole
    (`fetch(name)` -> a local path), and a header stub (`write_header_stub`) of each top-level .safetensors file,
    read from `url_of(name)`. Returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [f for f in files if "/" not in f]
    for name in files:
        if name in SMALL_FILES:
            shutil.copyfile(fetch(name), dest / name)
    for name in files:
        if name.endswith(".safetensors"):
            head, total = read_remote_safetensors_header(url_of(name), headers)
            write_header_stub(dest / name, head, total)
    return dest


def hub_snapshot(repo_id: str, dest: Path, revision: str | None = None) -> Path:
    """`header_only_snapshot` of the hub repository `repo_id` (huggingface_hub for the file list, the small
    files and the URLs and credentials of the range reads). Raises CheckpointError when it cannot be reached."""
    try:
        from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import build_hf_headers
    except ImportError:
        raise CheckpointError(f"{repo_id}: not a local path, and huggingface_hub is not installed to fetch it"
                              ) from None
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as e:  # network/offline/auth errors come in many classes
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            raise CheckpointError(f"{repo_id}: not a local path, and the hub has no accessible repository by that "
                                  f"name ({kind})") from None
        raise CheckpointError(f"{repo_id}: not a local path and the Hugging Face hub could not be reached ({kind}); "
                              "download it where the network allows and pass the local directory") from None
    return header_only_snapshot(files, dest, lambda name: hf_hub_download(repo_id, name, revision=revision),
                                lambda name: hf_hub_url(repo_id, name, revision=revision), build_hf_headers())
