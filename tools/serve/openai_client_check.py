"""Checks `florence serve` with the official OpenAI Python client (`pip install openai`): model
listing, a vision chat completion, a streamed one, and the client's error classes for a wrong API
key and a non-data: image URL.

    florence serve --model DIR --port 8765 --api-key k1 &
    python tools/serve/openai_client_check.py --url http://127.0.0.1:8765/v1 --api-key k1 --image photo.png

Prints what the client received and exits non-zero when something is not as documented.
"""

import argparse
import base64
import mimetypes
import sys

import openai
from openai import OpenAI


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's /v1 base URL")
    p.add_argument("--api-key", default="none", help="the server's --api-key (any text without one)")
    p.add_argument("--image", required=True, help="an image file to caption")
    p.add_argument("--max-tokens", type=int, default=20)
    a = p.parse_args()

    client = OpenAI(base_url=a.url, api_key=a.api_key, max_retries=0)
    mime = mimetypes.guess_type(a.image)[0] or "image/png"
    data = base64.b64encode(open(a.image, "rb").read()).decode()
    url = f"data:{mime};base64,{data}"
    model = client.models.list().data[0].id
    print("model:", model)

    reply = client.chat.completions.create(
        model=model,
        max_tokens=a.max_tokens,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "<CAPTION>"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    )
    content = reply.choices[0].message.content
    print("caption:", repr(content), reply.usage)
    assert isinstance(content, str) and reply.usage.completion_tokens > 0

    # Greedy search streams the caption as it grows; the pieces add up to the greedy caption.
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    stream = client.chat.completions.create(
        model=model, max_tokens=a.max_tokens, messages=messages, stream=True, extra_body={"num_beams": 1}
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    whole = client.chat.completions.create(
        model=model, max_tokens=a.max_tokens, messages=messages, extra_body={"num_beams": 1}
    ).choices[0].message.content
    print("streamed:", pieces)
    assert "".join(pieces) == whole, (pieces, whole)

    try:
        OpenAI(base_url=a.url, api_key=a.api_key + "-wrong", max_retries=0).models.list()
        wrong_key = "accepted"
    except openai.AuthenticationError as e:
        wrong_key = f"AuthenticationError: {e.message}"
    except openai.NotFoundError:
        wrong_key = "accepted"
    print("wrong key:", wrong_key)

    try:
        client.chat.completions.create(
            model=model,
            max_tokens=a.max_tokens,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        )
        print("a remote URL was accepted")
        return 1
    except openai.BadRequestError as e:
        print("remote URL:", f"BadRequestError: {e.message}")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
