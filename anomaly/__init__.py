"""patchwatch's pure algorithm core: arrays in, arrays out; no files, URLs or orchestration."""
