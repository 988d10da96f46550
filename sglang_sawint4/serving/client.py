"""HTTP client of a running server (standard library only: it runs on the bare GPU host).

Every benchmark, check and evaluation that talks to ``python -m sglang_sawint4.launch_server``
goes through these helpers: JSON requests, server-sent-event streams, SGLang's native
``/generate`` with logprobs, and random token-id prompts.
"""

from __future__ import annotations

import http.client
import json

HOST = "127.0.0.1"


def request(port, method, path, body=None, timeout=300):
    """One HTTP request; body is a JSON-able object or raw bytes (e.g. malformed JSON)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body)
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def load_row(payload):
    """The first (DP rank 0) row of a /v1/loads answer ({"loads": [...]} or a bare list), or {}."""
    rows = payload.get("loads", payload) if isinstance(payload, dict) else payload
    return rows[0] if rows else {}


def served_model_id(port):
    """The model name the OpenAI endpoints expect."""
    return request(port, "GET", "/v1/models")[1]["data"][0]["id"]


def stream_events(port, path, body, max_events=None, timeout=300):
    """POST with stream=True; returns (status, parsed SSE events) or (status, error body).
    With max_events the client disconnects after that many events (the server must
    abort the request)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    events = []
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.read()[:300]
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                events.append("[DONE]")
                break
            events.append(json.loads(payload))
            if max_events is not None and len(events) >= max_events:
                break
    finally:
        conn.close()
    return resp.status, events


def stream(port, path, body, max_events=None, timeout=300):
    """stream_events that raises on a non-200 answer; returns the events."""
    status, events = stream_events(port, path, body, max_events, timeout)
    if status != 200:
        raise RuntimeError(f"{path} stream -> {status} {events!r}")
    return events


def generate_ids(port, input_ids, max_new_tokens, **extra):
    st, r = request(port, "POST", "/generate", {"input_ids": input_ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}, **extra})
    if st != 200:
        raise RuntimeError(f"/generate -> {st}: {str(r)[:300]}")
    return r


def greedy_outputs(port, prompts_ids, n, top_logprobs=5):
    """Greedy output ids, their logprobs and, per step, {token id: logprob} of the top candidates."""
    outs = []
    for ids in prompts_ids:
        meta = generate_ids(port, ids, n, return_logprob=True, top_logprobs_num=top_logprobs)["meta_info"]
        outs.append({"ids": [t[1] for t in meta["output_token_logprobs"]],
                     "logprobs": [t[0] for t in meta["output_token_logprobs"]],
                     "top": [{t[1]: t[0] for t in step or []} for step in meta["output_top_logprobs"]]})
    return outs


FIRST_PLAIN_TOKEN_ID = 10  # random prompts stay clear of the generated tokenizers' special tokens


def random_token_ids(rng, vocab, n):
    """n token ids drawn by ``rng`` (a random.Random) from the non-special part of the vocabulary."""
    return [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab) for _ in range(n)]
