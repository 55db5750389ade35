"""Files are written whole or not at all; downloads are checked; caches carry a checksum."""

import hashlib
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fewshot.data import omniglot as og
from fewshot.data.files import download, load_cache, save_cache
from fewshot.errors import DataError
from fewshot.files import atomic_path

PAYLOAD = b"the real archive\n" * 100
HTML = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>"


class Server(BaseHTTPRequestHandler):
    """What a download can meet: the file, an HTML page, other bytes, a cut-off transfer, a 404."""

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/missing":
            self.send_error(404)
            return
        body = {"/good": PAYLOAD, "/html": HTML, "/other": PAYLOAD[:-1] + b"?"}.get(path)
        self.send_response(200)
        # "/short": announces the whole file, sends a tenth of it, and hangs up.
        self.send_header("Content-Length", str(len(body or PAYLOAD)))
        self.end_headers()
        self.wfile.write(body or PAYLOAD[: len(PAYLOAD) // 10])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_keeps_a_file_whose_md5_matches(server, tmp_path):
    download(f"{server}/good", tmp_path / "a.zip", MD5)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["a.zip"]


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/html", "returned an HTML page with md5"),
        ("/other", f"returned a file with md5 {hashlib.md5(PAYLOAD[:-1] + b'?').hexdigest()}"),
        ("/short", f"stopped after {len(PAYLOAD) // 10} of {len(PAYLOAD)} bytes"),
        ("/missing", "could not be fetched (<HTTPError 404"),
    ],
)
def test_a_bad_download_is_refused_with_its_reason_and_leaves_nothing(
    server, tmp_path, path, reason
):
    with pytest.raises(DataError, match=f"{server}{path} {reason}".replace("(", r"\(")):
        download(f"{server}{path}", tmp_path / "a.zip", MD5)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial download


def test_a_failed_omniglot_download_says_why_and_where_to_get_the_data(
    server, tmp_path, monkeypatch
):
    monkeypatch.setattr(og, "URL", server + "/html?{}")
    with pytest.raises(DataError, match="Omniglot not found under data.root=.*an HTML page") as err:
        og.load_omniglot(tmp_path / "omniglot", 28, download=True, cache_dir=str(tmp_path / "c"))
    assert list((tmp_path / "omniglot").iterdir()) == []
    # It was already true: the message says what else to do, not to set it.
    assert "data.download=true could not fetch" in str(err.value)
    assert "set data.download=true" not in str(err.value)


def test_a_write_that_fails_leaves_the_previous_file_and_no_partial_one(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("crash in the middle of the write")
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]


KILLED_WHILE_WRITING = """
import os, signal, sys
from fewshot.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of the new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file_and_its_part_is_cleaned(tmp_path):
    target = tmp_path / "cache.pt"
    target.write_text("previous")
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(target)])
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "previous"
    (part,) = tmp_path.glob(".cache.pt.*.part")  # hidden, never read as the file
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]  # the dead writer's part is gone


def test_cache_round_trips_and_a_changed_byte_is_detected(tmp_path):
    path = tmp_path / "cache.pt"
    data = {"images": torch.arange(4096, dtype=torch.int32), "names": ["a", "b"]}
    save_cache(path, data)
    loaded = load_cache(path)
    assert torch.equal(loaded["images"], data["images"]) and loaded["names"] == ["a", "b"]
    raw = bytearray(path.read_bytes())
    at = raw.find((2024).to_bytes(4, "little"))  # element 2024 of the tensor, in the file
    raw[at] ^= 1
    path.write_bytes(bytes(raw))
    assert load_cache(path) is None
    assert load_cache(tmp_path / "absent.pt") is None
