// BackgroundStep: a step begun before its gradients exist gives the plain
// step's result once they arrive (from another thread, in any order);
// Cancel leaves nothing pending; an I/O failure is Finish's error.
#include "coordinator/background_step.h"

#include <chrono>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "io/fault_backend.h"
#include "tests/testutil/faulty_engine.h"
#include "tests/testutil/testutil.h"

namespace ztier::coordinator {
namespace {

using optim::DType;
using swapper::OptimizerSegment;
using swapper::OptimizerSwapper;
using swapper::StateArray;

const std::vector<OptimizerSegment> kSegments = {
    {1, 700, DType::kF32, 0}, {2, 1500, DType::kF32, 1}, {3, 33, DType::kF32, 0},
    {4, 2048, DType::kF32, 1}};

class BackgroundStepTest : public ::testing::Test {
 protected:
  // A swapper over kSegments in its own directory, step 0 written.
  std::unique_ptr<OptimizerSwapper> MakeSwapper(const std::string& name,
                                                std::vector<io::Fault> faults = {}) {
    engines_.push_back(ztier::testing::MakeFaultyAsyncEngine(
        io::BackendKind::kPsync, faults,
        io::EngineOptions{.block_size = 64 * 1024, .queue_depth = 8}, &fault_));
    swapper::OptimizerSwapperOptions o;
    o.store.paths = {dir_.File(name)};
    o.store.tag = "optimizer";
    o.store.stripe_bytes = 64 * 1024;
    o.buffer_count = 2;
    o.sub_group_size = 1000;
    o.threads = 2;
    o.isa = optim::BestIsa();
    auto sw = OptimizerSwapper::Create(o, kSegments, engines_.back().get());
    EXPECT_TRUE(sw.ok()) << sw.status().ToString();
    Status s = (*sw)->Initialize([](uint64_t id, void* out) {
      auto* f = static_cast<float*>(out);
      for (uint64_t i = 0; i < kSegments[id - 1].numel; ++i) f[i] = 0.01f * (i % 97) + id;
      return Status::Ok();
    });
    EXPECT_TRUE(s.ok()) << s.ToString();
    return std::move(sw).value();
  }

  std::vector<float>& Grad(uint64_t id) {
    auto& g = grads_[id];
    if (g.empty()) {
      g.resize(kSegments[id - 1].numel);
      for (size_t i = 0; i < g.size(); ++i) g[i] = 0.1f * static_cast<float>((i * id) % 13) - 0.6f;
    }
    return g;
  }

  std::vector<float> State(OptimizerSwapper& sw) {
    std::vector<float> all;
    for (const auto& seg : kSegments) {
      for (auto a : {StateArray::kMaster, StateArray::kExpAvg, StateArray::kExpAvgSq}) {
        std::vector<float> part(seg.numel);
        EXPECT_TRUE(sw.ReadState(seg.id, a, part.data()).ok());
        all.insert(all.end(), part.begin(), part.end());
      }
    }
    return all;
  }

  std::vector<optim::AdamHyper> Hypers() {
    std::vector<optim::AdamHyper> h(2);
    h[0].lr = 0.05;
    h[1].lr = 0.01;
    h[1].weight_decay = 0.1;
    return h;
  }

  ztier::testing::ScratchDir dir_;
  std::vector<std::unique_ptr<io::AsyncEngine>> engines_;
  io::FaultInjectingBackend* fault_ = nullptr;
  std::map<uint64_t, std::vector<float>> grads_;
};

TEST_F(BackgroundStepTest, GradientsFromAnotherThreadGiveThePlainStep) {
  auto plain = MakeSwapper("plain");
  std::map<uint64_t, std::vector<uint8_t>> plain_params;
  const auto hypers = Hypers();
  ASSERT_TRUE(plain
                  ->Step(
                      hypers,
                      [&](uint64_t id) -> Result<const void*> { return Grad(id).data(); },
                      [&](std::span<const uint64_t> ids, std::span<const void* const> data) {
                        for (size_t k = 0; k < ids.size(); ++k) {
                          const auto* p = static_cast<const uint8_t*>(data[k]);
                          plain_params[ids[k]].assign(p, p + 4 * kSegments[ids[k] - 1].numel);
                        }
                        return Status::Ok();
                      })
                  .ok());
  auto early = MakeSwapper("early");
  for (uint64_t id : {4, 3, 2, 1}) Grad(id);  // made before the threads start
  auto step = BackgroundStep::Start(early.get(), hypers);
  std::thread feeder([&] {
    for (uint64_t id : {4, 2, 3, 1}) {
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
      step->Ready(id, grads_.at(id).data());
    }
  });
  feeder.join();
  EXPECT_TRUE(step->IsReady(3));
  ASSERT_TRUE(step->Finish().ok());
  ASSERT_TRUE(early->commit_pending());
  std::map<uint64_t, std::vector<uint8_t>> staged(step->staged().begin(), step->staged().end());
  EXPECT_EQ(staged, plain_params);
  ASSERT_TRUE(early->Commit().ok());
  EXPECT_EQ(State(*early), State(*plain));
}

TEST_F(BackgroundStepTest, MissingGradientsAreNoneAndCancelKeepsThePreviousState) {
  auto sw = MakeSwapper("sw");
  const auto before = State(*sw);
  {
    auto step = BackgroundStep::Start(sw.get(), Hypers());
    step->Ready(4, Grad(4).data());
    step->Cancel();  // while it waits for the others
    step->Cancel();  // idempotent
    EXPECT_EQ(step->Finish().code(), StatusCode::kCancelled);
  }
  EXPECT_FALSE(sw->commit_pending());
  EXPECT_EQ(State(*sw), before);
  // Only parameter 2 has a gradient: the others keep their state.
  auto step = BackgroundStep::Start(sw.get(), Hypers());
  step->Ready(2, Grad(2).data());
  ASSERT_TRUE(step->Finish().ok());
  ASSERT_EQ(step->staged().size(), 1u);
  EXPECT_EQ(step->staged()[0].first, 2u);
  ASSERT_TRUE(sw->Commit().ok());
  const auto after = State(*sw);
  // Segment 1's state (the first 3 x 700 floats) is unchanged.
  EXPECT_TRUE(std::equal(after.begin(), after.begin() + 3 * 700, before.begin()));
  EXPECT_NE(after, before);
}

TEST_F(BackgroundStepTest, AReadErrorIsFinishsErrorAndNothingPends) {
  auto sw = MakeSwapper("sw", {});
  fault_->AddFault({io::FaultKind::kEio, 1, 1, io::Op::kRead});
  auto step = BackgroundStep::Start(sw.get(), Hypers());
  for (uint64_t id : {1, 2, 3, 4}) step->Ready(id, Grad(id).data());
  Status s = step->Finish();
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_FALSE(sw->commit_pending());
  EXPECT_EQ(sw->step(), 0u);
}

}  // namespace
}  // namespace ztier::coordinator
