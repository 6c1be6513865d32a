"""The demo's "Similar images" tab: an image in, the most similar indexed images out, with labels and scores.

Shown when the demo is given an index (`supmae-serve --index`, `python -m app --index`; the shipped gallery for
the bundled model). `SimilarService` is the Python behind it: the query image is decoded by
`supmae_serve.preprocess` (through `DemoService.load`, the server's limits), embedded by the same backend with
the index's pooling, and searched; the neighbours' thumbnails are read only through
`supmae_serve.features.gallery.SourceFiles`, i.e. only files inside the index's recorded image folders
(resolved, links and '..' followed), decoded with the same limits and shown as the model sees them (the
preprocessed input, upscaled nearest): no resizing here, only `supmae_serve.preprocess`. An index whose sources are not local image
files (tar shards) still answers, as a table without thumbnails.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from supmae_serve.features.gallery import SourceFiles, SourceRefused
from supmae_serve.preprocess import ImageError, batch, decode_image, resize_side, to_pil

MAX_NEIGHBOURS = 24  # the slider's end: a gallery of more is hard to take in
THUMB_SIDE = 96  # previews are upscaled (nearest) to about this many pixels


class SimilarService:
    """Search an index with an image from the page (`demo`: the DemoService of the same page)."""

    def __init__(self, demo, index):
        self.demo = demo
        self.index = index
        self.files = SourceFiles(index.path, index.manifest)
        self.pooling = index.identity.pooling

    @property
    def thumbnails(self) -> bool:
        return self.files.local_files

    def describe(self) -> str:
        m = self.index.manifest
        where = (
            "thumbnails from its image folder"
            if self.thumbnails
            else "no thumbnails: its sources are not local image files"
        )
        return (
            f"Index of **{len(self.index):,}** images ({m.get('kind')}, cosine similarity of the "
            f"{self.pooling}-pooled embeddings); {where}."
        )

    def preview(self, source: str) -> Image.Image:
        """The image behind `source` as the model sees it (supmae_serve.preprocess: resized and cropped to
        the model's input), upscaled (nearest) for display; SourceRefused / ImageError when it cannot be shown."""
        path = self.files.path(source)  # only inside the index's recorded image folders
        limits, prep = self.demo.config.limits, self.demo.prep
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"{size} bytes, over the limit of {limits.max_bytes}", 413)
        img = decode_image(path.read_bytes(), limits, resize_side(prep))
        return to_pil(batch([img], prep), prep, upscale=max(1, THUMB_SIDE // prep.image_size))[0]

    def _k(self, top_k: Any) -> int:
        from .demo import whole_number

        return whole_number(top_k, 1, MAX_NEIGHBOURS, "neighbours")

    def search(self, image, top_k: Any = 8) -> tuple[list[tuple[Image.Image, str]], str]:
        """(gallery of (thumbnail, caption), a Markdown table of rank, label, score and id)."""
        k = self._k(top_k)
        if image is None:  # the query was cleared
            return [], ""
        x = self.demo.load(image)  # (1, 3, S, S), gr.Error if unusable
        emb = self.demo.backend.embed(x, self.pooling).embedding  # (1, D)
        found = self.index.search(emb, k)[0]
        gallery, rows, hidden = [], [], 0
        for rank, n in enumerate(found, 1):
            caption = f"{n.label or 'unlabelled'} · {n.score:.3f}"
            rows.append(f"| {rank} | {n.label or ''} | {n.score:.4f} | {n.id} |")
            if not self.thumbnails:
                continue
            try:
                gallery.append((self.preview(n.source), caption))
            except (SourceRefused, ImageError, OSError):
                hidden += 1
        table = "| rank | label | cosine | id |\n| --- | --- | --- | --- |\n" + "\n".join(rows)
        if hidden:
            table += f"\n\n{hidden} neighbour(s) not shown: their files are missing, unreadable or outside the index's image folder."
        return gallery, table


def similar_tab(gr, similar: SimilarService, examples: list[str], image_input) -> None:
    """The tab's components and event, inside the page's `gr.Tabs()` (see `app.demo.build_demo`)."""
    with gr.Tab("Similar images", id="similar"):
        gr.Markdown(similar.describe())
        with gr.Row():
            with gr.Column(scale=1):
                query = image_input("Query image", "similar-image", examples)
                k = gr.Slider(1, MAX_NEIGHBOURS, value=8, step=1, label="Neighbours", elem_id="similar-k")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Most similar indexed images (label · cosine)",
                    elem_id="similar-gallery",
                    elem_classes=["pixelated"],
                    columns=4,
                    height=460,
                    object_fit="contain",
                    format="png",
                    visible=similar.thumbnails,
                    interactive=False,
                )
                table = gr.Markdown(elem_id="similar-table")
        query.change(similar.search, [query, k], [gallery, table], api_name="similar")
        k.release(similar.search, [query, k], [gallery, table], api_name=False)
