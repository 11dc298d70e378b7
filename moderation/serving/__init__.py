"""Helpers shared by the Triton python models (they import triton_python_backend_utils lazily, so the
package stays importable in tests and clients)."""
