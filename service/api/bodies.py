"""Reading image bytes out of request bodies: multipart uploads or JSON with base64.

Multipart parsing is capped in parts (``max_form_parts`` for files and for fields) so a body of 10,000
empty parts is refused after the cap instead of being parsed; the body size itself is capped by
``service.api.middleware`` while it streams in.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile

from model.data.base import LabelValue, as_label_value, label_problem
from service.api.errors import ApiError
from service.runtime.uploads import Upload
from service.settings import Settings

_LABEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_LABELS = 256


def _media_type(request: Request) -> str:
    """The body's media type; a compressed body (``Content-Encoding`` other than identity) is refused
    here, before it is parsed as what it is not (RFC 7694: 415, naming what is accepted)."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {coding!r} not accepted: send the body uncompressed (images are compressed "
            "already)",
            {"content_encoding": coding},
            headers={"Accept-Encoding": "identity"},
        )
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _form(request: Request, settings: Settings) -> FormData:
    parts = settings.max_form_parts
    form = await request.form(max_files=parts, max_fields=parts, max_part_size=1024 * 1024)
    if len(form.multi_items()) > parts:
        raise ApiError(413, "too_many_parts", f"at most {parts} multipart parts per request")
    return form


def _no_image(hint: str) -> ApiError:
    return ApiError(400, "missing_image", f"no image in the request: {hint}")


def _text_part(name: str) -> ApiError:
    return ApiError(
        400,
        "missing_image",
        f"the multipart part {name!r} has no filename, so it was read as text and its bytes are lost: send "
        f"the image as a file part (curl -F {name}=@photo.jpg; a filename in Content-Disposition)",
    )


_LABELS_FILE_BYTES = 1024 * 1024  # as a text field's cap (``max_part_size``)


async def _labels_text(value: UploadFile | str) -> str:
    """A ``labels`` part's JSON text, whether sent as a text field or as a file (curl -F labels=@x.json)."""
    if isinstance(value, str):
        return value
    data = await value.read(_LABELS_FILE_BYTES + 1)
    if len(data) > _LABELS_FILE_BYTES:
        raise ApiError(400, "bad_labels", f"a labels part is at most {_LABELS_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_labels", "a labels file must be UTF-8 JSON") from None


def _source_name(filename: str | None, index: int) -> str:
    """The client's file name as the gallery records it: its last 200 characters, with control and
    format characters (terminal escapes, bidirectional overrides) replaced by '_'."""
    name = (filename or f"upload-{index}")[-200:]
    return "".join("_" if unicodedata.category(c) in ("Cc", "Cf") else c for c in name)


_URL_SAFE = str.maketrans("-_", "+/")


def _decode_base64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "bad_json", "JSON field 'image' must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]  # a data: URL as produced by FileReader.readAsDataURL
    # What encoders commonly produce is accepted: MIME line breaks (`base64` on the command line wraps at
    # 76), the URL-safe alphabet (-_ for +/) and missing padding; anything else is refused.
    text = "".join(text.split()).translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", "JSON field 'image' is not valid base64") from None


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "bad_json", "the request body's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None


async def read_query_image(request: Request, settings: Settings) -> bytes:
    """The image of a search request: multipart field ``image`` or JSON ``{"image": base64}``."""
    hint = 'send multipart field \'image\', a JSON body {"image": "<base64>"}, or use ?by_id='
    media = _media_type(request)
    if media == "multipart/form-data":
        form = await _form(request, settings)
        try:
            value = form.get("image")
            if value is None:
                raise _no_image(hint)
            if isinstance(value, UploadFile):
                return await value.read()
            raise _text_part("image")  # its bytes were decoded as text: the image cannot be recovered
        finally:
            await form.close()
    if media in ("application/json", "") or media.endswith("+json"):
        body = await _json_body(request) if media else await _empty_or_error(request, hint)
        if not isinstance(body, dict) or "image" not in body:
            raise ApiError(400, "bad_json", "JSON body must be an object with an 'image' field (base64)")
        return _decode_base64(body["image"])
    raise ApiError(
        415, "unsupported_media_type", f"Content-Type {media!r} not accepted; {hint}", {"content_type": media}
    )


async def _empty_or_error(request: Request, hint: str) -> Any:
    raw = await request.body()
    if not raw:
        raise _no_image(hint)
    raise ApiError(400, "missing_content_type", f"the body has no Content-Type; {hint}")


def parse_labels(text: str) -> dict[str, LabelValue]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder can go
        raise ApiError(
            400, "bad_labels", 'labels must be a JSON object such as {"Smiling": 1, "colour": "green"}'
        ) from None
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise ApiError(400, "bad_labels", f"labels must be a JSON object of at most {MAX_LABELS} entries")
    labels: dict[str, LabelValue] = {}
    for name, given in value.items():
        if not _LABEL_NAME.match(name):
            raise ApiError(400, "bad_labels", f"label {name!r}: names are 1-64 of [A-Za-z0-9_.-]")
        label = as_label_value(given) if isinstance(given, str) else given
        problem = label_problem(label)
        if problem is not None:
            raise ApiError(400, "bad_labels", f"label {name!r}: {problem}")
        labels[name] = label
    return labels


async def read_gallery_uploads(request: Request, settings: Settings) -> list[Upload]:
    """Files of a ``POST /images``: multipart fields ``images`` (repeated) and optional ``labels``
    (one JSON object for all files, or one per file in the same order)."""
    if _media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "POST /images takes multipart/form-data")
    form = await _form(request, settings)
    try:
        images = [(k, v) for k, v in form.multi_items() if k in ("images", "image")]
        for name, value in images:
            if not isinstance(value, UploadFile):
                raise _text_part(name)
        files = [v for _, v in images if isinstance(v, UploadFile)]
        texts = [await _labels_text(v) for k, v in form.multi_items() if k == "labels"]
        if not files:
            raise _no_image("send one or more multipart file fields named 'images'")
        if len(files) > settings.max_upload_files:
            raise ApiError(413, "too_many_files", f"at most {settings.max_upload_files} images per request")
        labels = [parse_labels(t) for t in texts]
        if len(labels) not in (0, 1, len(files)):
            raise ApiError(400, "bad_labels", "give one labels object for all images or one per image")
        uploads = []
        for i, file in enumerate(files):
            own = labels[i] if len(labels) == len(files) else (labels[0] if labels else {})
            uploads.append(Upload(_source_name(file.filename, i), await file.read(), own))
        return uploads
    finally:
        await form.close()
