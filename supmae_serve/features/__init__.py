"""Features: bulk embeddings of a collection, the feature-set format, the FAISS index and search.

- `featureset`: the format (Parquet shards + features.json), its writer and reader;
- `inputs`: what the bulk job reads (ImageFolder, folder, list file, glob, WebDataset shards) with stable ids;
- `bulk`: the job behind `supmae-embed run` (DataLoader workers decode, a Backend embeds; torchrun ranks);
- `index`: build / extend / load a FAISS index over feature sets, and `search(vectors, top_k)`;
- `identity`: which model made the vectors, and the check against the model in hand;
- `retrieval`: precision@k and mAP of label agreement;
- `ray_data`: a callable class for Ray Data's `map_batches`.

pyarrow and faiss are imported inside the functions that need them (`pip install 'supmae[features]'`).
"""
