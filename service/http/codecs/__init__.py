"""What travels over HTTP, with no FastAPI in it: JSON rows and records, request bodies, .npy /
.npz arrays, content negotiation, and the Open Inference Protocol's tensors."""
