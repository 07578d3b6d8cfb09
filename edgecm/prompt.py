"""Turning a question (and an image) into token ids, with the checkpoint's own processor.

The checkpoint's processor expands the image placeholder into one token per
image feature and its chat template formats the turn. Without a chat
template, LLaVA checkpoints fall back to the LLaVA-1.5 format
``USER: <image>\\n{question} ASSISTANT:``; text-only models without one get
the question as plain text (a completion prompt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from edgecm.checkpoint import Checkpoint
from edgecm.errors import EdgecmError


@dataclass
class Prompt:
    """A tokenised prompt: ids (1, T), pixel values or None, and the rendered text.

    pixel_values are whatever the family's processor gives: (N, 3, H, W) for a
    fixed-size tower (LLaVA), or flattened patches (P, C * t * p * p) for a
    dynamic-resolution one (Qwen2.5-VL), which then also gives each image's
    patch grid (t, h, w) in ``image_grid_thw`` (N, 3); a video is one more grid.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    text: str
    image_token_id: int | None = None
    image_grid_thw: torch.Tensor | None = None
    # A video (Qwen2.5-VL): its flattened patches, its grid (1, 3), the seconds each temporal patch
    # spans (which scale its temporal position ids), and its placeholder token.
    video_pixel_values: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: tuple[float, ...] | None = None
    video_token_id: int | None = None
    # core-ref's reference token r: the first token of the assistant's header (LLaVA-1.5's ``ASSISTANT:``,
    # ChatML's ``<|im_start|>``), the token the released CoreMatching code reads; None: the last token.
    reference_index: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def vision_inputs(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(placeholder token id, pixel values, grids) of the images, then of the video, where present."""
        inputs = []
        if self.pixel_values is not None and self.image_token_id is not None:
            inputs.append((self.image_token_id, self.pixel_values, self.image_grid_thw))
        if self.video_pixel_values is not None and self.video_token_id is not None:
            inputs.append((self.video_token_id, self.video_pixel_values, self.video_grid_thw))
        return inputs

    @property
    def image_positions(self) -> torch.Tensor:
        """Positions holding vision features (image and video tokens), derived from the placeholder tokens
        (never fixed offsets): the tokens CoreMatching chooses among."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for token_id, _, _ in self.vision_inputs():
            mask |= self.input_ids[0] == token_id
        return mask.nonzero().flatten()


def _quiet_transformers() -> None:
    # The image-processor backend fallback and similar notices are not for end users.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class PromptBuilder:
    """Loads the tokenizer (and, for a vision-language model, the processor) of a checkpoint.

    ``min_pixels`` / ``max_pixels`` override a dynamic-resolution processor's
    limits (Qwen2.5-VL): they decide how many tokens an image costs.
    """

    def __init__(self, checkpoint: Checkpoint, min_pixels: int | None = None, max_pixels: int | None = None):
        _quiet_transformers()
        import transformers

        self.config = checkpoint.config
        self.family = checkpoint.family
        src = checkpoint.tokenizer_source
        try:
            if self.config.is_multimodal:
                self.processor = self.family.load_processor(src.directory, self.config, min_pixels, max_pixels)
                self.tokenizer = self.processor.tokenizer
            else:
                self.processor = None
                kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.directory), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgecmError(
                f"{src.directory}: cannot load the tokenizer/processor ({first_line}); "
                f"copy the checkpoint's tokenizer and processor files next to config.json"
            ) from None
        self.chat_template = getattr(self.processor or self.tokenizer, "chat_template", None)
        # Strings the tokenizer turns into control tokens: in a user's text they would forge an image
        # placeholder or a turn boundary, so such text is refused instead of re-parsed.
        reserved = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        for attribute in ("image_token", "video_token"):
            token = getattr(self.processor, attribute, None) or getattr(self.tokenizer, attribute, None)
            if token:
                reserved.add(token)
        self.reserved_strings = tuple(sorted(t for t in reserved if t))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.text.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return tuple(ids)

    def render(self, question: str, with_image: bool) -> str:
        """The prompt text for one user turn, ending where the assistant's answer begins."""
        return self.render_conversation([("user", question)], 0 if with_image else None)

    def render_conversation(
        self, turns: list[tuple[str, str]], image_turn: int | None, video_turn: int | None = None,
        generation_prompt: bool = True,
    ) -> str:
        """A whole conversation ((role, text) pairs, ending with a user turn) as prompt text.

        ``image_turn`` / ``video_turn`` is the index of the user turn the image / video belongs to (None: none).
        Without ``generation_prompt`` the text stops before the assistant's header (chat templates only).
        """
        if video_turn is not None and not self.chat_template:
            raise EdgecmError("a video prompt needs the checkpoint's chat template; copy chat_template.json beside it")
        if self.chat_template:
            if self.processor is not None:
                messages = []
                for i, (role, text) in enumerate(turns):
                    content = ([{"type": "image"}] if i == image_turn else []) + (
                        [{"type": "video"}] if i == video_turn else []
                    ) + [{"type": "text", "text": text}]
                    messages.append({"role": role, "content": content})
                return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                          tokenize=False)
            messages = [{"role": role, "content": text} for role, text in turns]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=False)
        return self.family.fallback_prompt(turns, image_turn, self.tokenizer.eos_token or "")

    def assistant_header(self, turns: list[tuple[str, str]]) -> str | None:
        """The text that opens the assistant's turn at the end of these turns' prompt; None for a plain
        completion prompt, which has none."""
        if not self.chat_template:
            return None if self.family.plain_single_turn and len(turns) == 1 else self.family.assistant_header
        full = self.render_conversation(turns, None)
        before = self.render_conversation(turns, None, generation_prompt=False)
        header = full[len(before):] if full.startswith(before) else ""
        return header if header.strip() else None

    def reference_index(self, input_ids: torch.Tensor, header: str | None) -> int | None:
        """Where the assistant's header starts in ``input_ids`` (1, T): the latest token from which the
        decoded tail still holds the whole header. Found by decoding, since a header's tokens depend on what
        precedes them; None where there is no header."""
        if header is None:
            return None
        ids = input_ids[0].tolist()
        wanted = header.strip()
        for start in range(len(ids) - 1, max(-1, len(ids) - 65), -1):
            if wanted in self.tokenizer.decode(ids[start:], skip_special_tokens=False):
                return start
        return None

    def build(self, question: str, image=None, video=None) -> Prompt:
        """Tokenise one turn; ``image`` is a PIL image or None, ``video`` an ``edgecm.video.Video`` or None."""
        return self.build_conversation([("user", question)], image, 0, video)

    def check_text(self, text: str) -> None:
        """Refuse text that holds one of the tokenizer's control strings, such as ``<image>``, or bytes that
        are not UTF-8 (Python reads those from argv and pipes as lone surrogates, which tokenizers reject)."""
        stray = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
        if stray is not None:
            byte = f"byte \\x{ord(stray) - 0xDC00:02x}" if ord(stray) >= 0xDC80 else f"U+{ord(stray):04X}"
            raise EdgecmError(f"the text holds {byte}, which is not UTF-8 text; write it in UTF-8 "
                              f"(iconv -t UTF-8 converts a file)")
        found = next((t for t in self.reserved_strings if t in text), None)
        if found is not None:
            raise EdgecmError(
                f"the text contains {found!r}, which this model reserves for its prompt format; "
                f"rephrase without it (images are attached with --image, never written into the text)"
            )

    def build_conversation(
        self, turns: list[tuple[str, str]], image=None, image_turn: int | None = 0, video=None,
        video_turn: int | None = None,
    ) -> Prompt:
        """Tokenise a conversation; ``image`` (PIL or None) belongs to user turn ``image_turn``, ``video``
        (an ``edgecm.video.Video`` or None) to ``video_turn`` (default: the image's turn)."""
        for role, text in turns:
            if role == "user":
                self.check_text(text)
        if (image is not None or video is not None) and not self.config.is_multimodal:
            raise EdgecmError("this is a text-only model; drop --image or pass --model a vision-language checkpoint")
        if video_turn is None:
            video_turn = image_turn
        text = self.render_conversation(
            turns, image_turn if image is not None else None, video_turn if video is not None else None
        )
        bos = self.tokenizer.bos_token
        # A template that already writes BOS must not get a second one from the tokenizer.
        add_special = not (bos and text.startswith(bos))
        if video is not None:
            if not self.family.takes_video:
                raise EdgecmError("this model takes no video; drop the video or pass a Qwen2.5-VL checkpoint")
            enc = self.processor(images=image, text=text, videos=video, add_special_tokens=add_special)
            prompt = Prompt(
                enc["input_ids"], enc.get("pixel_values"), text, self.config.image_token_id, enc.get("image_grid_thw"),
                video_pixel_values=enc["pixel_values_videos"], video_grid_thw=enc["video_grid_thw"],
                second_per_grid_ts=tuple(enc["second_per_grid_ts"]), video_token_id=enc["video_token_id"],
            )
            self.family.check_prompt(self.config, prompt)
            return self._with_reference(prompt, turns)
        if image is not None:
            enc = self.processor(images=image, text=text, return_tensors="pt", add_special_tokens=add_special)
            prompt = Prompt(
                enc["input_ids"], enc["pixel_values"], text, self.config.image_token_id, enc.get("image_grid_thw")
            )
            self.family.check_prompt(self.config, prompt)
            return self._with_reference(prompt, turns)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
        return self._with_reference(Prompt(enc["input_ids"], None, text, self.config.image_token_id), turns)

    def _with_reference(self, prompt: Prompt, turns: list[tuple[str, str]]) -> Prompt:
        prompt.reference_index = self.reference_index(prompt.input_ids, self.assistant_header(turns))
        return prompt

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class TextStream:
    """Incremental detokenisation: yields only text that will not change as more tokens arrive."""

    def __init__(self, builder: PromptBuilder):
        self.builder = builder
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.builder.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
