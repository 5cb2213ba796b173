"""What an attribution returns: the ranked training images of one query (``Attribution``), each an
``AttributionRow`` with its share of the query's influence, as JSON or as the compact provenance
record written into an attributed image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .shares import share_text


@dataclass
class AttributionRow:
    """One training image in a query's ranking.

    Attributes:
        rank: 1 for the most influential image.
        key: The training sample's key in the store.
        path: Absolute path of the training image.
        caption: The training caption.
        score: The method's ranking score (``das_sd.score.ranking``: t^2 for das, t for signed methods).
        sign: Sign of the signed effect t: +1, -1, or 0.
        share: The image's share of the query's positive influence over all N training images
            (``das_sd.shares``, as ``das-sd inspect`` defines it): the number to read; None when
            not known (a record of an older das-sd).
    """
    rank: int
    key: str
    path: str  # absolute path of the training image
    caption: str
    score: float  # the method's ranking score (das_sd.score.ranking: t^2 for das)
    sign: int  # sign of the signed effect t (+1 / -1 / 0)
    share: float | None = None  # share of the positive influence (das_sd.shares)

    def label(self) -> str:
        """Caption for galleries: rank, share of the influence and the training caption.

        Returns:
            E.g. ``"#1 · 23.4% · a photo of ..."``; the raw score and sign instead of the share when
            the share is not known.
        """
        return f"#{self.rank} · {share_text(self.share, self.score, self.sign)} · {self.caption}"


@dataclass
class Attribution:
    """The ranked training images of one query.

    Attributes:
        method: The method that ranked them (``registry.METHODS``).
        query: What was attributed: its ``prompt``, and e.g. its ``source`` file or the caller's info.
        results: The top-k rows, best first.
        notes: What the user must know to read the ranking, e.g. that the store differentiates only
            part of the LoRA (``--allow-partial``); empty when nothing.
    """
    method: str
    query: dict
    results: list[AttributionRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The attribution as JSON-ready data (what ``das-sd attribute --json`` prints).

        Returns:
            ``{"method": ..., "query": ..., "results": [row as a dict, ...], "notes": [...]}``.
        """
        return {"method": self.method, "query": self.query, "results": [asdict(r) for r in self.results],
                "notes": list(self.notes)}

    def provenance(self, store_id: str) -> dict:
        """The compact record written into an attributed image's metadata.

        Args:
            store_id: The store's id (``FeatureStore.store_id``), to tell which store ranked them.

        Returns:
            ``{"method", "store_id", "top_k": [{"rank", "key", "share" (6 decimals: the number to
            read, ``das_sd.shares``), "score" (6 significant digits), "sign"}, ...]}``.
        """
        return {"method": self.method, "store_id": store_id,
                "top_k": [{"rank": r.rank, "key": r.key,
                           "share": None if r.share is None else round(r.share, 6),
                           "score": float(f"{r.score:.6g}"), "sign": r.sign}
                          for r in self.results]}
