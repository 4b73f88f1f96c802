# Calls the model proxy from inside a sandbox, the way the SDKs do, and reports what came back
# as one JSON line: status, text, the usage the answer carried, and for streams the arrival
# time (ms) of every event. Usage: modelcall.py anthropic|openai stream|whole TEXT [API_KEY]
import http.client
import json
import os
import sys
import time
import urllib.parse

flavour, mode, text = sys.argv[1:4]
override = sys.argv[4] if len(sys.argv) > 4 else None
stream = mode == "stream"
messages = [{"role": "user", "content": text}]
if flavour == "anthropic":
    base, key = os.environ["ANTHROPIC_BASE_URL"], override or os.environ["ANTHROPIC_API_KEY"]
    path = "/v1/messages"
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = {"model": "claude-test", "max_tokens": 100, "stream": stream, "messages": messages}
else:
    base, key = os.environ["OPENAI_BASE_URL"], override or os.environ["OPENAI_API_KEY"]
    path = "/chat/completions"
    headers = {"authorization": "Bearer " + key, "content-type": "application/json"}
    body = {"model": "gpt-test", "stream": stream, "messages": messages}

url = urllib.parse.urlsplit(base)
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
start = time.monotonic()
conn.request("POST", url.path + path, json.dumps(body), headers)
resp = conn.getresponse()
out = {"status": resp.status, "text": "", "input": 0, "output": 0, "arrivals": []}
if resp.status != 200:
    out["error"] = json.loads(resp.read())
    out["should_retry"] = resp.getheader("x-should-retry")
elif not stream:
    v = json.loads(resp.read())
    if flavour == "anthropic":
        out["text"] = v["content"][0]["text"]
        out["input"], out["output"] = v["usage"]["input_tokens"], v["usage"]["output_tokens"]
    else:
        out["text"] = v["choices"][0]["message"]["content"]
        out["input"], out["output"] = v["usage"]["prompt_tokens"], v["usage"]["completion_tokens"]
else:
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        out["arrivals"].append(round((time.monotonic() - start) * 1000))
        if data == "[DONE]":
            continue
        v = json.loads(data)
        if flavour == "anthropic":
            kind = v.get("type")
            if kind == "message_start":
                out["input"] = v["message"]["usage"]["input_tokens"]
            elif kind == "content_block_delta":
                out["text"] += v["delta"]["text"]
            elif kind == "message_delta":
                out["output"] = v["usage"]["output_tokens"]
        else:
            for choice in v.get("choices", []):
                out["text"] += choice["delta"].get("content") or ""
            if v.get("usage"):
                out["input"], out["output"] = v["usage"]["prompt_tokens"], v["usage"]["completion_tokens"]
    out["text"] = out["text"].strip()
print(json.dumps(out))
