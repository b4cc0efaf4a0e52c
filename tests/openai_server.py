"""A local OpenAI-compatible chat-completions server for the judge tests, run as its own process:

    python tests/openai_server.py --port 0 --port-file PATH [--delay S] [--fail-first N] [--status 503]
                                  [--api-key KEY]

It answers POST /v1/chat/completions by a deterministic rule, the demo's arithmetic checker
(tasks.machinery.synthetic:arithmetic_reward), applied to the judge prompt it is sent: a score prompt ("Question: ..."
and "Reply: ...") gets "10" for a right sum and "1" otherwise; a compare prompt ("Reply A: ..." and
"Reply B: ...") gets the letter of the right reply, and "A" when both or neither are right (a judge with a
position bias, as real ones have). Any other prompt is a request for text (a teacher's): one that names two
numbers gets their sum, written by a teacher who drops the carry of a sum of 15 or more (so a verifier has
something to catch); one without gets "Answer with the number only." (a system prompt, for prompt search). --delay sleeps before answering (a slow server); --fail-first answers the
first N requests with --status (a failing one); --api-key refuses other keys with 401. GET /stats reports
requests seen and the most in flight at once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.machinery.synthetic import arithmetic_reward  # noqa: E402


def verdict(prompt: str, rule: str = "arithmetic") -> str:
    if rule == "shorter":  # prefers the shorter reply; scores by brevity
        pair = re.search(r"Reply A: (.*?)\n\nReply B: (.*)$", prompt, re.S)
        if pair:
            return "B" if len(pair.group(2).strip()) < len(pair.group(1).strip()) else "A"
        reply = re.search(r"Reply: (.*)$", prompt, re.S)
        return str(max(1, 10 - len(reply.group(1).strip()))) if reply else "1"
    if "Reply" not in prompt:  # a teacher's request
        numbers = [int(n) for n in re.findall(r"\d+", prompt)[:2]]
        if len(numbers) < 2:
            return "Answer with the number only."
        total = sum(numbers)
        return str(total - 10 if total >= 15 else total)
    question = re.search(r"Question: (.*?)\n\n", prompt, re.S)
    question = question.group(1) if question else ""

    def right(reply: str) -> bool:
        return arithmetic_reward([question], [reply])[0] == 1.0

    pair = re.search(r"Reply A: (.*?)\n\nReply B: (.*)$", prompt, re.S)
    if pair:
        a, b = right(pair.group(1)), right(pair.group(2))
        return "B" if b and not a else "A"
    reply = re.search(r"Reply: (.*)$", prompt, re.S)
    return "10" if reply and right(reply.group(1)) else "1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--api-key")
    parser.add_argument("--rule", choices=("arithmetic", "shorter"), default="arithmetic")
    args = parser.parse_args()
    lock = threading.Lock()
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "prompts": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            with lock:
                self._reply(200, {k: v for k, v in stats.items()})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with lock:
                stats["requests"] += 1
                number = stats["requests"]
                stats["in_flight"] += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            try:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                    return self._reply(401, {"error": {"message": "invalid api key"}})
                if args.delay:
                    time.sleep(args.delay)
                if number <= args.fail_first:
                    return self._reply(args.status, {"error": {"message": "try again later"}})
                prompt = body["messages"][-1]["content"]
                with lock:
                    stats["prompts"].append(prompt)
                self._reply(200, {"id": f"chatcmpl-{number}", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": verdict(prompt, args.rule)}}]})
            finally:
                with lock:
                    stats["in_flight"] -= 1

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    Path(args.port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
