// An AsyncEngine whose backend injects faults, for the suites above io/
// (header-only: ztier_testutil itself links base only).
#pragma once

#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "io/async_engine.h"
#include "io/fault_backend.h"

namespace ztier::testing {

// Backend `kind` wrapped in a FaultInjectingBackend holding `faults`, under
// an Engine with `options` and an AsyncEngine. `*fault` receives the wrapper
// (owned by the engine: more faults may be added later). Null, with a test
// failure recorded, if any layer cannot be created.
inline std::unique_ptr<io::AsyncEngine> MakeFaultyAsyncEngine(io::BackendKind kind,
                                                              const std::vector<io::Fault>& faults,
                                                              const io::EngineOptions& options,
                                                              io::FaultInjectingBackend** fault) {
  auto backend = io::CreateBackend(kind, io::BackendOptions{});
  EXPECT_TRUE(backend.ok()) << backend.status().ToString();
  if (!backend.ok()) return nullptr;
  auto wrapper = std::make_unique<io::FaultInjectingBackend>(std::move(backend).value());
  *fault = wrapper.get();
  for (const auto& f : faults) wrapper->AddFault(f);
  auto engine = io::Engine::Create(std::move(wrapper), options);
  EXPECT_TRUE(engine.ok()) << engine.status().ToString();
  if (!engine.ok()) return nullptr;
  auto async = io::AsyncEngine::Create(std::move(engine).value());
  EXPECT_TRUE(async.ok()) << async.status().ToString();
  if (!async.ok()) return nullptr;
  return std::move(async).value();
}

}  // namespace ztier::testing
