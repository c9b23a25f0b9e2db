"""`--model org/name[@revision]`: the real `huggingface_hub` resolution code, never the network.

A Hub cache folder is laid out by the tests themselves (`models--org--name/blobs`, `snapshots/<commit>/` symlinks,
`refs/main`) holding stories260K, and resolved with HF_HUB_OFFLINE=1. The Hub's failures (gated, missing repo,
no network) are produced by the library itself, from a local HTTP server answering as the Hub does
(`X-Error-Code` headers) or from a port where nothing listens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from tests.engine.test_loader import make_hf_model, our_logits

from int8serve.cli import main
from int8serve.engine.errors import CheckpointError
from int8serve.engine.hub import HubError, HubId, choose_files, fetch, parse_hub_id
from int8serve.engine.loader import load_model
from int8serve.engine.model_source import resolve
from int8serve.engine.tokenizer import load_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ["config.json", "model.safetensors", "tokenizer.model"]
VOCAB_SIZE = 49152  # SmolLM2's


def lay_out_hub_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT, files: list[str] = FILES) -> Path:
    """`cache/models--org--name/` as huggingface_hub writes it: content-addressed blobs, a snapshot of symlinks."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        data = (source / name).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, stories_hf: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "tiny-org/stories260K", stories_hf)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def logits(path: Path) -> torch.Tensor:
    model = load_model(path, "fp32").model
    tokens = torch.tensor([[1, 403, 407, 261, 378, 442, 290]])
    return model(tokens, model.new_cache(1, tokens.shape[1]), [0], [0], all_logits=True)


# --- what is a Hub id --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("meta-llama/Llama-2-7b-chat-hf", HubId("meta-llama/Llama-2-7b-chat-hf")),
    ("TheBloke/Llama-2-7B-Chat-fp16@main", HubId("TheBloke/Llama-2-7B-Chat-fp16", "main")),
    (f"org/name@{COMMIT}", HubId("org/name", COMMIT)),
    ("org/name@refs/pr/3", HubId("org/name", "refs/pr/3")),
    ("/models/llama", None), ("./org/name", None), ("../x/y", None), ("~/x", None), ("a/b/c", None),
    ("llama", None), ("org/llama-2-7b-chat.Q8_0.gguf", None), ("org/", None),
])
def test_hub_ids_and_paths_are_told_apart(text: str, expected: HubId | None) -> None:
    assert parse_hub_id(text) == expected


def test_a_local_folder_shaped_like_a_hub_id_stays_local(tmp_path: Path, stories_hf: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(stories_hf, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve("org/name") == Path("org/name")


@pytest.mark.parametrize(("files", "chosen"), [
    # meta-llama/Llama-2-7b-chat-hf holds both: the safetensors shards win, .bin shards are never fetched
    (["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
      "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model", "README.md", "LICENSE.txt"],
     ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "tokenizer.model"]),
    (["config.json", "pytorch_model.bin", "tokenizer.model"], ["config.json", "pytorch_model.bin", "tokenizer.model"]),
    (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.model", "original/consolidated.00.pth"],
     ["config.json", "model.safetensors", "tokenizer.model"]),
    (["params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model", "checklist.chk"],
     ["params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model"]),
    # shaped like HuggingFaceTB/SmolLM2-135M-Instruct: byte-level BPE, no tokenizer.model
    (["config.json", "generation_config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
      "tokenizer.json", "tokenizer_config.json", "vocab.json", "README.md", "onnx/model.onnx"],
     ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
    (["config.json", "model.safetensors", "tokenizer.json"], ["config.json", "model.safetensors", "tokenizer.json"]),
])
def test_only_the_files_the_loader_reads_are_chosen(files: list[str], chosen: list[str]) -> None:
    assert choose_files(files) == chosen


@pytest.mark.parametrize(("files", "message"), [
    (["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"],
     r"neither tokenizer.model \(SentencePiece\) nor tokenizer.json \(byte-level BPE\)"),
    (["config.json", "tokenizer.model", "model.gguf"], "no model.safetensors"),
    (["README.md", "tokenizer.model"], "neither config.json"),
])
def test_repos_the_loader_cannot_read_are_refused(files: list[str], message: str) -> None:
    with pytest.raises(HubError, match=message):
        choose_files(files)


# --- resolution through the Hub cache, offline --------------------------------------------------------------------


def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads_as_the_folder(hub_cache: Path, stories_hf: Path) -> None:
    snapshot = resolve("tiny-org/stories260K")
    assert snapshot == hub_cache / "models--tiny-org--stories260K" / "snapshots" / COMMIT
    assert torch.equal(logits(snapshot), logits(stories_hf))


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_a_revision_resolves_by_ref_or_commit(hub_cache: Path, revision: str) -> None:
    assert resolve(f"tiny-org/stories260K@{revision}").name == COMMIT


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = hub_cache.parent / "hf-home"
    shutil.move(hub_cache, home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve("tiny-org/stories260K").is_relative_to(home / "hub")


def test_offline_and_not_cached_says_so(hub_cache: Path) -> None:
    with pytest.raises(HubError, match=r"not in the local Hub cache .* HF_HUB_OFFLINE is set"):
        resolve("tiny-org/other-model")
    with pytest.raises(HubError, match="not in the local Hub cache"):
        resolve("tiny-org/stories260K@v2")  # no such ref cached


def test_an_interrupted_download_in_the_cache_is_named(hub_cache: Path) -> None:
    snapshot = hub_cache / "models--tiny-org--stories260K" / "snapshots" / COMMIT
    (snapshot / "model.safetensors").unlink()  # the library links a file into the snapshot once it is complete
    with pytest.raises(HubError, match=r"the cached snapshot is incomplete \(the repo has config.json but no model"):
        resolve("tiny-org/stories260K")


def test_a_path_that_is_no_hub_id_and_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such model folder or \.gguf file"):
        resolve(tmp_path / "missing")


# --- the Hub's refusals, raised by huggingface_hub itself -------------------------------------------------------


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a gated repo (`gated`) or a missing one (anything else)."""

    def do_GET(self) -> None:
        gated = "/gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to model is restricted." if gated else "Repository not found")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_gated_model_without_a_token_says_how_to_get_access(fake_hub: str) -> None:
    import huggingface_hub.errors

    advice = "gated model: accept its license at https://huggingface.co/meta/gated-7b, then set HF_TOKEN"
    with pytest.raises(HubError, match=re.escape(advice)) as caught:
        fetch(HubId("meta/gated-7b"), endpoint=fake_hub)
    assert isinstance(caught.value.__cause__, huggingface_hub.errors.GatedRepoError)


def test_a_gated_model_with_a_token_that_has_no_access(fake_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(HubError, match="the token in HF_TOKEN has no access"):
        fetch(HubId("meta/gated-7b"), endpoint=fake_hub)


def test_a_missing_repo_is_named(fake_hub: str) -> None:
    import huggingface_hub.errors

    with pytest.raises(HubError, match="no-org/no-model: no such model on the Hub") as caught:
        fetch(HubId("no-org/no-model"), endpoint=fake_hub)
    assert isinstance(caught.value.__cause__, huggingface_hub.errors.RepositoryNotFoundError)


def test_no_network_and_nothing_cached(fake_hub: str) -> None:
    import huggingface_hub.errors

    with socket.socket() as probe:  # a port where nothing listens: the connection is refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(HubError, match=r"not in the local Hub cache .* the Hub cannot be reached") as caught:
        fetch(HubId("meta/llama"), endpoint=closed)
    assert isinstance(caught.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


def test_no_network_but_cached_uses_the_cache(fake_hub: str, stories_hf: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lay_out_hub_cache(tmp_path / "empty-hub", "tiny-org/stories260K", stories_hf)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert fetch(HubId("tiny-org/stories260K"), endpoint=closed).name == COMMIT


# --- the command line, as a user runs it ------------------------------------------------------------------------


def test_generate_with_a_hub_id_offline(hub_cache: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "int8serve", "generate", "--model", "tiny-org/stories260K", "--raw",
                             "--temperature", "0", "--max-tokens", "8", "Once upon a time"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(", there was a little girl")  # as from the folder (test_cli.py)


def test_a_hub_id_that_cannot_be_had_is_one_clear_line(hub_cache: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "tiny-org/missing", "hi"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("int8serve generate: error: tiny-org/missing: not in the local Hub cache")


# --- a download, by the library, from a Hub that serves stories260K beside a .bin copy of it --------------------


class ServingHub(BaseHTTPRequestHandler):
    """The few Hub routes `snapshot_download` uses for `repo`: revision info, the file tree, each file's /resolve/."""

    repo: ClassVar[str] = ""
    files: ClassVar[dict[str, bytes]] = {}
    fetched: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        if path.startswith(f"/api/models/{self.repo}/revision/"):
            payload = json.dumps({"id": self.repo, "sha": COMMIT,
                                  "siblings": [{"rfilename": name} for name in self.files]}).encode()
            return self._send(payload, {"Content-Type": "application/json"}, body)
        if path.startswith(f"/api/models/{self.repo}/tree/"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.files.items()]
            return self._send(json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        prefix = f"/{self.repo}/resolve/"
        if path.startswith(prefix):
            name = path.removeprefix(prefix).split("/", 1)[1]
            data = self.files[name]
            if body:
                self.fetched.append(name)
            return self._send(data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def download(repo: str, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`fetch(repo)` into the empty Hub cache tmp_path/hub, from a ServingHub holding `files`."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    ServingHub.repo, ServingHub.files, ServingHub.fetched = repo, files, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ServingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return fetch(HubId(repo), endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_fetches_only_what_the_loader_reads(tmp_path: Path, stories_hf: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: (stories_hf / name).read_bytes() for name in FILES}
    files.update({"pytorch_model.bin": b"\0" * 1000, "README.md": b"# stories260K\n",
                  "tokenizer.json": (stories_hf / "tokenizer.json").read_bytes()})
    snapshot = download("tiny-org/stories260K", files, tmp_path, monkeypatch)
    assert sorted(ServingHub.fetched) == sorted(FILES)  # never the .bin, the README or tokenizer.json
    assert snapshot == tmp_path / "hub" / "models--tiny-org--stories260K" / "snapshots" / COMMIT
    assert torch.equal(logits(snapshot), logits(stories_hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and it is then in the cache
    assert resolve("tiny-org/stories260K") == snapshot


# --- a byte-level BPE repo: tokenizer.json and no tokenizer.model, as HuggingFaceTB/SmolLM2-135M-Instruct ---------

BPE_REPO = "tiny-org/smollm2-shaped"
BPE_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def bpe_repo(tmp_path_factory: pytest.TempPathFactory, smollm2_reference_tokenizer: Any) -> Path:
    """The files of a repo shaped like SmolLM2-135M-Instruct's: a tiny random Llama with SmolLM2's 49152-token
    vocabulary and tied embeddings (config.json, model.safetensors, generation_config.json), SmolLM2's own
    tokenizer.json and the repo's tokenizer_config.json (which names <|im_start|> as BOS and <|im_end|> as EOS), and
    files the loader never reads (vocab.json, merges.txt, a README)."""
    folder = tmp_path_factory.mktemp("smollm2-shaped")
    make_hf_model(vocab_size=VOCAB_SIZE, tie_word_embeddings=True).save_pretrained(folder)
    smollm2_reference_tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                               "model_max_length": 8192}))
    for name in ("vocab.json", "merges.txt", "README.md"):
        (folder / name).write_text("not read\n")
    return folder


def test_a_bpe_repo_downloads_tokenizer_json_and_its_config(bpe_repo: Path, tmp_path: Path,
                                                            smollm2_reference_tokenizer: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    files = {p.name: p.read_bytes() for p in bpe_repo.iterdir()}
    assert set(files) > {*BPE_FILES, "generation_config.json", "README.md"}
    snapshot = download(BPE_REPO, files, tmp_path, monkeypatch)
    assert sorted(ServingHub.fetched) == sorted(BPE_FILES)
    loaded = load_model(snapshot, "fp32")
    assert loaded.tokenizer_path == snapshot / "tokenizer.json"
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    assert tokenizer.encode(QUESTION) == smollm2_reference_tokenizer.encode(QUESTION, add_special_tokens=False)
    # the BOS only tokenizer_config.json names (without it, bos_id falls back to EOS)
    assert tokenizer.bos_id == tokenizer.token_id("<|im_start|>")
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>")
    tokens = torch.tensor([tokenizer.encode(QUESTION)])
    assert torch.equal(our_logits(loaded, tokens), our_logits(load_model(bpe_repo, "fp32"), tokens))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and it is then in the cache
    assert resolve(BPE_REPO) == snapshot


def test_a_bpe_repo_resolves_from_the_cache_offline(bpe_repo: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = lay_out_hub_cache(tmp_path / "hub", BPE_REPO, bpe_repo, files=BPE_FILES)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(BPE_REPO) == snapshot
    (snapshot / "tokenizer.json").unlink()  # an interrupted download: neither tokenizer is there
    with pytest.raises(HubError, match=r"incomplete \(the repo has neither tokenizer.model .* nor tokenizer.json"):
        resolve(BPE_REPO)
