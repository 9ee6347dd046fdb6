"""Chat-message shaping every stage-1 engine shares: content parts, the system-prompt merge, images.

The prompt builders (:mod:`u2s.stage1.prompts`) write OpenAI-style messages with ``{"type": "image"}``
placeholder parts; each engine reshapes them for its transport with these helpers, so text flattening,
part wrapping, the system merge and image encoding are the same wherever a prompt goes.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

#: How an engine treats system messages: as they are, always merged into the first user turn, or
#: merged once the model's chat template (or the server) has rejected a system role.
SystemPrompt = Literal["auto", "system_role", "merge_into_user"]


def text_of(content: str | list[dict]) -> str:
    """A message's text: a string as it is, a part list's text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def text_only(conversation: list[dict]) -> list[dict]:
    """Text models: content-part lists become plain strings (not every text chat template takes parts)."""
    return [{**m, "content": text_of(m["content"])} for m in conversation]


def with_parts(conversation: list[dict]) -> list[dict]:
    """Vision models: string content becomes one text part (many processor templates iterate parts)."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in conversation
    ]


def with_image_part(conversation: list[dict], part: dict | None) -> list[dict]:
    """``{"type": "image"}`` parts become ``part`` (an engine's image content part; dropped when None)."""
    image = [] if part is None else [part]
    out = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [new for p in content for new in (image if p.get("type") == "image" else [p])]
        out.append({**message, "content": content})
    return out


def with_image_url(conversation: list[dict], url: str | None) -> list[dict]:
    """``{"type": "image"}`` parts become OpenAI ``image_url`` parts holding ``url`` (dropped when None)."""
    return with_image_part(
        conversation, None if url is None else {"type": "image_url", "image_url": {"url": url}}
    )


def has_system(conversation: list[dict]) -> bool:
    return any(m.get("role") == "system" for m in conversation)


def merge_system_into_user(messages: list[dict]) -> list[dict]:
    """The system text moved to the start of the first user turn (templates without a system role).

    A text part list keeps its image parts first; the system text joins the first text part.
    """
    system = "\n\n".join(text_of(m["content"]) for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for index, message in enumerate(rest):
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            merged: str | list[dict] = f"{system}\n\n{content}"
        else:
            parts = [dict(p) for p in content]
            texts = [i for i, p in enumerate(parts) if p.get("type") == "text"]
            if texts:
                parts[texts[0]]["text"] = f"{system}\n\n{parts[texts[0]]['text']}"
            else:
                parts.append({"type": "text", "text": system})
            merged = parts
        return [*rest[:index], {**message, "content": merged}, *rest[index + 1 :]]
    return [{"role": "user", "content": system}, *rest]


def fit_image(img: Image.Image, size: int) -> Image.Image:
    """Downscale ``img`` (aspect kept) to fit ``size``×``size``; smaller images are returned as they are."""
    from PIL import Image

    width, height = img.size
    scale = size / max(width, height)
    if scale >= 1:
        return img
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def image_data_url(img: Image.Image, size: int, image_format: str = "JPEG", quality: int = 90) -> str:
    """``img`` fitted into ``size``×``size`` (aspect kept, never upscaled) as a base64 data URL.

    ``image_format`` is "JPEG" (at ``quality``) or "PNG".
    """
    fitted = fit_image(img, size)
    buf = io.BytesIO()
    if image_format == "JPEG":
        (fitted if fitted.mode == "RGB" else fitted.convert("RGB")).save(buf, format="JPEG", quality=quality)
    else:
        fitted.save(buf, format=image_format)
    mime = "jpeg" if image_format == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
