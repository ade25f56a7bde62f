// Shared helpers for the fastface C++ kernels: argument validation on numpy buffers, bf16 <-> fp32,
// runtime CPU feature checks.
//
// Calling convention (every binding in bindings.cpp follows it): tensors arrive as numpy arrays
// (`t.numpy()`, zero-copy for contiguous CPU tensors); bfloat16 tensors arrive as their int16 view
// (`t.view(torch.int16).numpy()`), so a 2-byte integer buffer *is* bf16 wherever a float tensor is
// expected. Nothing links libtorch. Every kernel validates ndim, shape, dtype, C-contiguity and index
// ranges here, before touching memory, and raises
//   ValueError  (std::invalid_argument) for a bad shape, contiguity or value,
//   TypeError   (pybind11::type_error)  for a bad dtype,
// naming the argument. Compute runs with the GIL released.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastface {

namespace py = pybind11;

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------

enum class DType { F32, BF16, I64, I32, U8, I8, Other };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::I64: return "int64";
    case DType::I32: return "int32";
    case DType::U8: return "bool/uint8";
    case DType::I8: return "int8";
    default: return "unsupported";
  }
}

// The dtype a buffer stands for under the calling convention above.
inline DType dtype_of(const py::buffer_info& b) {
  if (b.format.empty()) return DType::Other;
  const char f = b.format.back();  // format may carry a byte-order prefix ('<', '=')
  if (b.itemsize == 4 && f == 'f') return DType::F32;
  if (b.itemsize == 2 && (f == 'h' || f == 'H')) return DType::BF16;
  if (b.itemsize == 8 && (f == 'q' || f == 'l' || f == 'Q' || f == 'L')) return DType::I64;
  if (b.itemsize == 4 && (f == 'i' || f == 'I')) return DType::I32;
  if (b.itemsize == 1 && (f == '?' || f == 'B')) return DType::U8;
  if (b.itemsize == 1 && f == 'b') return DType::I8;
  return DType::Other;
}

// ---------------------------------------------------------------------------------------------
// validation
// ---------------------------------------------------------------------------------------------

inline std::string shape_str(const std::vector<py::ssize_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

[[noreturn]] inline void value_error(const std::string& msg) { throw std::invalid_argument(msg); }
[[noreturn]] inline void type_error(const std::string& msg) { throw py::type_error(msg); }

inline bool is_c_contiguous(const py::buffer_info& b) {
  py::ssize_t expected = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != expected) return false;
    expected *= b.shape[d];
  }
  return true;
}

// A validated, C-contiguous view of one argument.
struct Arg {
  py::buffer_info info;
  DType dtype;
  const char* name;
  py::ssize_t dim(int d) const { return info.shape[d]; }
  py::ssize_t numel() const { return info.size; }
  template <class T> const T* data() const { return static_cast<const T*>(info.ptr); }
  template <class T> T* mutable_data() const { return static_cast<T*>(info.ptr); }
};

// Check ndim and dtype (one of `allowed`) of `obj`, any strides; returns the buffer view.
inline Arg require_any_strides(const py::object& obj, const char* name, int ndim,
                               std::initializer_list<DType> allowed, bool writable = false) {
  if (!py::isinstance<py::buffer>(obj)) {
    type_error(std::string(name) + " must be a numpy array (a tensor's .numpy()), got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::buffer_info info;
  try {
    info = py::reinterpret_borrow<py::buffer>(obj).request(writable);
  } catch (py::error_already_set& e) {
    if (!writable) throw;
    value_error(std::string(name) + " must be a writable array: " + e.what());
  }
  DType dt = dtype_of(info);
  bool ok = false;
  for (DType a : allowed) ok = ok || (a == dt);
  if (!ok) {
    std::string names;
    for (DType a : allowed) names += (names.empty() ? "" : ", ") + std::string(dtype_name(a));
    type_error(std::string(name) + " must have dtype in (" + names + "), got format '" + info.format +
               "' with itemsize " + std::to_string(info.itemsize));
  }
  if (info.ndim != ndim) {
    value_error(std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
                shape_str(info.shape));
  }
  return Arg{std::move(info), dt, name};
}

// Check ndim, dtype (one of `allowed`) and C-contiguity of `obj`; returns the buffer view.
inline Arg require(const py::object& obj, const char* name, int ndim, std::initializer_list<DType> allowed,
                   bool writable = false) {
  Arg a = require_any_strides(obj, name, ndim, allowed, writable);
  if (!is_c_contiguous(a.info)) value_error(std::string(name) + " must be C-contiguous");
  return a;
}

// Check ndim and dtype of `obj` and that its last dim is contiguous (rows of elements, any row strides).
inline Arg require_rows(const py::object& obj, const char* name, int ndim, std::initializer_list<DType> allowed) {
  Arg a = require_any_strides(obj, name, ndim, allowed);
  const py::ssize_t last = a.info.shape[ndim - 1];
  if (last > 1 && a.info.strides[ndim - 1] != a.info.itemsize) {
    value_error(std::string(name) + " must be contiguous in its last dim, got a stride of " +
                std::to_string(a.info.strides[ndim - 1]) + " bytes");
  }
  for (int d = 0; d < ndim; ++d) {
    if (a.info.strides[d] < 0 || a.info.strides[d] % a.info.itemsize != 0) {
      value_error(std::string(name) + " must have non-negative strides in whole elements");
    }
  }
  return a;
}

// Check that `a` has exactly `shape` (-1 = any size in that dim).
inline void require_shape(const Arg& a, std::initializer_list<py::ssize_t> shape) {
  size_t d = 0;
  bool ok = a.info.ndim == static_cast<py::ssize_t>(shape.size());
  for (py::ssize_t s : shape) {
    if (ok && s >= 0 && a.info.shape[d] != s) ok = false;
    ++d;
  }
  if (!ok) {
    std::vector<py::ssize_t> want(shape);
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < want.size(); ++i) {
      o << (i ? ", " : "");
      if (want[i] < 0) o << "*"; else o << want[i];
    }
    o << ")";
    value_error(std::string(a.name) + " must have shape " + o.str() + ", got " + shape_str(a.info.shape));
  }
}

inline void require_same_dtype(const Arg& a, const Arg& ref) {
  if (a.dtype != ref.dtype) {
    type_error(std::string(a.name) + " dtype " + dtype_name(a.dtype) + " does not match " + ref.name + " dtype " +
               dtype_name(ref.dtype));
  }
}

// Every value of an int64 array in [lo, hi).
inline void require_range_i64(const Arg& a, int64_t lo, int64_t hi) {
  const int64_t* p = a.data<int64_t>();
  for (py::ssize_t i = 0; i < a.numel(); ++i) {
    if (p[i] < lo || p[i] >= hi) {
      value_error(std::string(a.name) + " must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                  "), got " + std::to_string(p[i]) + " at index " + std::to_string(i));
    }
  }
}

inline void require_int(const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    value_error(std::string(name) + "=" + std::to_string(v) + " out of range [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "]");
  }
}

// ---------------------------------------------------------------------------------------------
// bfloat16 (stored as uint16_t): conversions identical to torch's
// ---------------------------------------------------------------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN -- same as c10::BFloat16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// One element of a float32 or bfloat16 (uint16_t) array, read as / written from float32 (kernels templated on T).
inline float load_elem(const float* p) { return *p; }
inline float load_elem(const uint16_t* p) { return bf16_to_f32(*p); }
inline void store_elem(float* p, float v) { *p = v; }
inline void store_elem(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// ---------------------------------------------------------------------------------------------
// runtime CPU features (the build targets baseline x86-64; fast paths are chosen per call)
// ---------------------------------------------------------------------------------------------

struct CpuFeatures {
  bool avx2_fma = false;     // AVX2 + FMA
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ
  bool avx512_bf16 = false;  // vdpbf16ps, vcvtne2ps2bf16
  bool avx512_vnni = false;  // vpdpbusd: u8 x s8 dot products of 4 into int32
  bool amx_bf16 = false;     // AMX tiles usable by this process (kernel permission granted)
};

const CpuFeatures& cpu_features();  // defined once, in bindings.cpp

}  // namespace fastface
