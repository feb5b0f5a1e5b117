"""p2pgrid: a peer-to-peer network for private machine learning."""
