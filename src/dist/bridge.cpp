// The C ABI between med3d (Rust) and libtorch's c10d: a TCPStore
// rendezvous, one process group (Gloo for CPU tensors, NCCL for CUDA
// tensors when this file is compiled with USE_C10D_NCCL), and the
// collectives data-parallel training needs. Every entry point catches C++
// exceptions and hands their message back through `err` (malloc'd, freed
// with med3d_c10d_free_str), so a c10d failure becomes a Rust error and
// never reaches std::terminate.
//
// Tensors cross the boundary as `at::Tensor*` (tch's C_tensor).
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void set_err(char** err, const std::string& msg) {
  if (err == nullptr) return;
  char* s = static_cast<char*>(std::malloc(msg.size() + 1));
  if (s == nullptr) return;
  std::memcpy(s, msg.c_str(), msg.size() + 1);
  *err = s;
}

// Runs `f`, turning any exception into a message; returns 0 on success.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, e.what());
  } catch (...) {
    set_err(err, "unknown C++ exception in c10d");
  }
  return 1;
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& w) {
  // Gloo enforces its own per-operation timeout; wait() rethrows the
  // operation's exception (peer closed, timeout) here.
  w->wait(g->timeout);
}

}  // namespace

extern "C" {

void med3d_c10d_free_str(char* s) { std::free(s); }

// 1 when this bridge was compiled with ProcessGroupNCCL.
int med3d_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous at host:port and build the process group. `agent_store`: the
// launcher (torchrun) already serves the store, so every rank is a client;
// otherwise rank 0 serves it. `prefix` namespaces the keys. `nccl`: 1 for
// ProcessGroupNCCL (CUDA tensors), 0 for Gloo (CPU tensors). Returns null
// on error.
void* med3d_c10d_new(const char* host, int port, int rank, int world_size, int64_t timeout_ms, int agent_store,
                     const char* prefix, int nccl, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = agent_store == 0 && rank == 0;
    so.numWorkers = agent_store == 0 ? std::optional<std::size_t>(world_size) : std::nullopt;
    so.waitWorkers = agent_store == 0;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (nccl != 0) {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, opts);
#else
      throw std::runtime_error("this med3d was built without ProcessGroupNCCL (libtorch without CUDA, or nccl.h missing)");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && *ifname != 0) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, opts);
    }
    out = new Group{store, backend, timeout};
  });
  return out;
}

void med3d_c10d_free(void* g) { delete static_cast<Group*>(g); }

// In-place sum over ranks.
int med3d_c10d_allreduce_sum(void* g, const at::Tensor* t, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = grp->timeout;
    wait(grp, grp->backend->allreduce(ts, o));
  });
}

// In place: every rank ends with `root`'s values.
int med3d_c10d_broadcast(void* g, const at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = grp->timeout;
    wait(grp, grp->backend->broadcast(ts, o));
  });
}

// Every rank's `t`, stacked in rank order: a new [world, ...] tensor.
void* med3d_c10d_allgather(void* g, const at::Tensor* t, char** err) {
  at::Tensor* out = nullptr;
  guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    auto in = t->contiguous();
    std::vector<at::Tensor> inputs{in};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < grp->backend->getSize(); ++r) outputs[0].push_back(at::empty_like(in));
    c10d::AllgatherOptions o;
    o.timeout = grp->timeout;
    wait(grp, grp->backend->allgather(outputs, inputs, o));
    out = new at::Tensor(at::stack(outputs[0], 0));
  });
  return out;
}

int med3d_c10d_barrier(void* g, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    c10d::BarrierOptions o;
    o.timeout = grp->timeout;
    wait(grp, grp->backend->barrier(o));
  });
}

// param.grad = grad (tch has no setter for a gradient that is undefined).
int med3d_c10d_set_grad(const at::Tensor* param, const at::Tensor* grad, char** err) {
  return guarded(err, [&] {
    at::Tensor p = *param;
    p.mutable_grad() = *grad;
  });
}

}  // extern "C"
