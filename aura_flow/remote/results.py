"""What a remote generation returns: the images that arrived, the failures, the account's balance."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..params import MAX_SEED


def batch_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a batch: one request per image, seeds seed, seed+1, ... modulo 2**64."""
    return (seed + index) % (MAX_SEED + 1)


@dataclass
class RemoteImage:
    index: int  # position in the batch
    seed: int | None  # the seed used (the service's x-seed-value when it reports one; None: fetched, not said)
    data: bytes  # the body exactly as received (no metadata added)
    format: str  # webp | jpg | png, from the bytes
    width: int
    height: int
    image: object  # PIL.Image.Image in RGB
    headers: dict = field(default_factory=dict)  # the accounting headers, lower-case names
    nsfw: bool | None = None  # fal's has_nsfw_concepts for this image (None: not reported)
    prompt_used: str | None = None  # the prompt the service drew when it differs from the one sent (expand_prompt)

    @property
    def remaining_credits(self) -> Optional[str]:
        return self.headers.get("x-remaining-credits")

    @property
    def request_id(self) -> Optional[str]:
        """The service's id of the request that made this image (find a billed result again with it)."""
        return self.headers.get("x-request-id")


@dataclass
class RemoteResult:
    params: dict  # the validated parameters of the whole call
    images: list = field(default_factory=list)  # RemoteImage, in batch order
    failures: list = field(default_factory=list)  # RemoteError with .index, in batch order
    remaining_credits: Optional[str] = None  # the lowest balance the responses reported (the latest)
    api_version: str = "v2"  # the API that made them: v2 (the queue) or v1 (sync); "queue" for fal
    provider: str = "segmind"
    model: str = "aura-flow"

    @property
    def seed(self) -> int:
        """The seed of the first image that arrived (the requested one if none did)."""
        return self.images[0].seed if self.images else self.params["seed"]

    @property
    def request_ids(self) -> list:
        """The request id of every image that arrived, in batch order (None where the service named none)."""
        return [im.request_id for im in self.images]

    def metadata(self) -> dict:
        """What to embed in saved images: the API version and, per image, its seed and request id; per failure its
        request id (a failure the service named may still have been billed); fal's: the provider and model, and per
        image its NSFW flag and the prompt drawn when it differs. Never the key."""
        images = []
        for im in self.images:
            entry = {"index": im.index, "seed": im.seed, "request_id": im.request_id}
            if im.nsfw is not None:
                entry["has_nsfw_concepts"] = im.nsfw
            if im.prompt_used is not None:
                entry["prompt_used"] = im.prompt_used
            images.append(entry)
        head = {} if self.provider == "segmind" else {"provider": self.provider, "model": self.model}
        return {**head, "api_version": self.api_version, "images": images,
                "failed": [{"index": e.index, "request_id": e.request_id} for e in self.failures]}

    def failure_summary(self) -> str:
        n = self.params["number_of_images"]
        return "; ".join(f"image {e.index + 1}/{n} failed: {e}" for e in self.failures)
