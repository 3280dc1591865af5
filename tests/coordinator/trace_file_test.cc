// ztier-trace-v1 files (coordinator/trace_file.h): round trips, every
// validation error with its JSON path, model shapes, the generator's
// invariants, and the shapes and traces shipped in configs/.
#include "coordinator/trace_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/testutil/testutil.h"

namespace ztier::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kSource = ZTIER_SOURCE_DIR;

std::string ModelPath(const std::string& name) {
  return kSource + "/configs/models/" + name + ".yaml";
}

ModelShape LoadShapeOrDie(const std::string& name) {
  Result<ModelShape> s = LoadModelShape(ModelPath(name));
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? *s : ModelShape{};
}

TraceFile GenerateOrDie(const ModelShape& shape,
                        const TraceGenOptions& o = {}) {
  Result<TraceFile> t = GenerateTrace(shape, o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? *t : TraceFile{};
}

uint64_t TotalNumel(const TraceFile& t) {
  uint64_t n = 0;
  for (const TraceParam& p : t.params) n += p.numel;
  return n;
}

const TraceModule* FindModule(const TraceFile& t, const std::string& name) {
  for (const TraceModule& m : t.modules) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

const TraceParam* FindParam(const TraceFile& t, const std::string& name) {
  for (const TraceParam& p : t.params) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

TraceEvent Fetch(uint64_t m, bool forward) {
  return TraceEvent{TraceOp::kFetch, m, forward, !forward};
}
TraceEvent Release(uint64_t m, bool backward) {
  return TraceEvent{TraceOp::kRelease, m, !backward, backward};
}

// A small trace using every field.
TraceFile HandMadeTrace() {
  TraceFile t;
  t.world_size = 4;
  t.model = "hand \"made\"";
  t.params = {{0, 4096, false, ParamTier::kNvme, "a.weight"},
              {1, 64, true, ParamTier::kHost, "a.bias"},
              {7, 1, false, ParamTier::kDevice, ""}};
  t.modules = {{0, "root", {}, std::nullopt, 0},
               {1, "a", {0, 1}, 0, 123456789012ULL},
               {5, "", {7, 0}, 0, 0}};
  t.steps = {
      {Fetch(0, true), Fetch(1, true), Release(1, false), Fetch(5, true),
       Release(5, false), Release(0, false), Fetch(0, false), Fetch(5, false),
       Release(5, true), Fetch(1, false), Release(1, true), Release(0, true)},
      {},
      {Fetch(1, true), Fetch(1, true), Release(1, false), Release(1, false)}};
  t.config = {{"coordinator.prefetch_bucket_size", "50000000"},
              {"io.backend", "\"psync\""},
              {"tiers.nvme.paths", "[\"/a\",\"/b\"]"},
              {"integrity.enabled", "true"}};
  return t;
}

// ---------------------------------------------------------------------------
// Round trips and the file's layout.

TEST(TraceJson, RoundTripOfAHandMadeTrace) {
  TraceFile t = HandMadeTrace();
  std::string json = TraceToJson(t);
  Result<TraceFile> back = ParseTrace(json, "hand.json");
  ASSERT_TRUE(back.ok()) << back.status().ToString() << "\n" << json;
  EXPECT_EQ(*back, t);
  EXPECT_EQ(TraceToJson(*back), json);
}

TEST(TraceJson, RoundTripOfGeneratedTraces) {
  for (const char* name : {"tiny", "llama-tiny", "moe-small"}) {
    for (bool ckpt : {false, true}) {
      TraceGenOptions o;
      o.checkpointing = ckpt;
      o.world_size = 2;
      TraceFile t = GenerateOrDie(LoadShapeOrDie(name), o);
      Result<TraceFile> back = ParseTrace(TraceToJson(t), name);
      ASSERT_TRUE(back.ok()) << name << ": " << back.status().ToString();
      EXPECT_EQ(*back, t) << name << " checkpointing=" << ckpt;
    }
  }
}

TEST(TraceJson, OneObjectPerLine) {
  TraceFile t = HandMadeTrace();
  std::string json = TraceToJson(t);
  std::istringstream in(json);
  std::string line;
  size_t events = 0, params = 0, modules = 0;
  while (std::getline(in, line)) {
    if (line.find("\"op\"") != std::string::npos) {
      ++events;
      EXPECT_EQ(line.find("\"op\"", line.find("\"op\"") + 1), std::string::npos)
          << line;
    }
    if (line.find("\"numel\"") != std::string::npos) ++params;
    if (line.find("\"flops\"") != std::string::npos) ++modules;
  }
  EXPECT_EQ(events, 16u);
  EXPECT_EQ(params, 3u);
  EXPECT_EQ(modules, 3u);
  EXPECT_EQ(json.rfind("{\"format\": \"ztier-trace-v1\",\n", 0), 0u);
  EXPECT_EQ(json.back(), '\n');
}

TEST(TraceJson, EventFlagsDefaultAndAreComplements) {
  const char* json = R"({"format": "ztier-trace-v1",
    "params": [{"id": 0, "numel": 8}],
    "modules": [{"id": 0, "params": [0]}],
    "steps": [[{"op": "fetch", "module": 0},
               {"op": "release", "module": 0},
               {"op": "fetch", "module": 0, "forward": false},
               {"op": "release", "module": 0, "backward": true}]]})";
  Result<TraceFile> t = ParseTrace(json, "x");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->world_size, 1u);
  EXPECT_EQ(t->params[0].tier, ParamTier::kNvme);
  EXPECT_FALSE(t->params[0].persist);
  ASSERT_EQ(t->steps.size(), 1u);
  EXPECT_EQ(t->steps[0],
            (std::vector<TraceEvent>{Fetch(0, true), Release(0, false),
                                     Fetch(0, false), Release(0, true)}));
}

TEST(TraceJson, NestedConfigIsFlattened) {
  const char* json =
      R"({"format": "ztier-trace-v1", "params": [], "modules": [],
    "steps": [], "config": {"coordinator": {"prefetch_bucket_size": 5e7},
                            "io.queue_depth": 64, "io": {"backend": "uring"}}})";
  Result<TraceFile> t = ParseTrace(json, "x");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->config.at("coordinator.prefetch_bucket_size"), "50000000.0");
  EXPECT_EQ(t->config.at("io.queue_depth"), "64");
  EXPECT_EQ(t->config.at("io.backend"), "\"uring\"");
}

TEST(TraceJson, ConfigTextThatIsNotJsonIsWrittenAsAString) {
  TraceFile t;
  t.config["io.backend"] = "psync";
  Result<TraceFile> back = ParseTrace(TraceToJson(t), "x");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->config.at("io.backend"), "\"psync\"");
}

TEST(TraceFileIo, SaveAndLoad) {
  testing::ScratchDir dir;
  std::string path = dir.File("t.json");
  TraceFile t = HandMadeTrace();
  ASSERT_TRUE(SaveTrace(t, path).ok());
  TraceFile u = GenerateOrDie(LoadShapeOrDie("tiny"));
  ASSERT_TRUE(SaveTrace(u, path).ok());  // replaces the old file
  Result<TraceFile> back = LoadTrace(path);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, u);
  // Only the target remains: the temporary file was renamed over it.
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    ++files;
    EXPECT_EQ(e.path().filename(), "t.json");
  }
  EXPECT_EQ(files, 1u);
}

TEST(TraceFileIo, Errors) {
  testing::ScratchDir dir;
  Result<TraceFile> missing = LoadTrace(dir.File("nope.json"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("nope.json"));

  Status s = SaveTrace(HandMadeTrace(), dir.File("no/such/dir/t.json"));
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("no/such/dir"));

  std::ofstream(dir.File("bad.json"))
      << "{\"format\": \"ztier-trace-v1\",\n \"params\": [,]}";
  Result<TraceFile> bad = LoadTrace(dir.File("bad.json"));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("bad.json: not valid JSON"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("line 2"));
}

// ---------------------------------------------------------------------------
// Validation: each error names its JSON path.

struct BadTrace {
  const char* what;
  std::string body;      // JSON after the "format" key
  const char* expected;  // substring of the error message
};

std::string Wrap(const std::string& body) {
  return "{\"format\": \"ztier-trace-v1\", " + body + "}";
}

// params 0..1, modules 0 (params 0, 1) and 1 (no params), child of 0.
const std::string kPM =
    R"("params": [{"id": 0, "numel": 10}, {"id": 1, "numel": 20}],
       "modules": [{"id": 0, "name": "a", "params": [0, 1]},
                   {"id": 1, "name": "b", "params": [], "parent": 0}], )";

TEST(TraceValidation, EachErrorNamesItsPath) {
  const BadTrace cases[] = {
      {"module typo", R"("params": [], "modles": [], "steps": [])",
       "x.json: modles: unknown key (did you mean 'modules'?)"},
      {"unknown key",
       R"("params": [], "modules": [], "steps": [], "colour": 1)",
       "colour: unknown key (valid keys: format, world_size"},
      {"missing steps", R"("params": [], "modules": [])",
       "steps: missing (required)"},
      {"world size 0",
       R"("world_size": 0, "params": [], "modules": [], "steps": [])",
       "world_size: must be at least 1, got 0"},
      {"params not array", R"("params": {}, "modules": [], "steps": [])",
       "params: expected an array, got object"},
      {"duplicate param",
       R"("params": [{"id": 3, "numel": 1}, {"id": 3, "numel": 2}],
                             "modules": [], "steps": [])",
       "params[1].id: duplicate param id 3 (also params[0])"},
      {"numel 0",
       R"("params": [{"id": 0, "numel": 0}], "modules": [], "steps": [])",
       "params[0].numel: must be at least 1, got 0"},
      {"numel negative",
       R"("params": [{"id": 0, "numel": -5}], "modules": [], "steps": [])",
       "params[0].numel: must not be negative, got -5"},
      {"numel fraction",
       R"("params": [{"id": 0, "numel": 1.5}], "modules": [], "steps": [])",
       "params[0].numel: expected a non-negative whole number, got 1.5"},
      {"numel string",
       R"("params": [{"id": 0, "numel": "8"}], "modules": [], "steps": [])",
       "params[0].numel: expected a non-negative whole number, got string"},
      {"missing numel", R"("params": [{"id": 0}], "modules": [], "steps": [])",
       "params[0].numel: missing (required)"},
      {"param key typo", R"("params": [{"id": 0, "numel": 1, "persits": true}],
                            "modules": [], "steps": [])",
       "params[0].persits: unknown key (did you mean 'persist'?)"},
      {"bad tier", R"("params": [{"id": 0, "numel": 1, "tier": "disk"}],
                      "modules": [], "steps": [])",
       "params[0].tier: unknown tier 'disk' (use nvme, host or device)"},
      {"persist not bool", R"("params": [{"id": 0, "numel": 1, "persist": 1}],
                              "modules": [], "steps": [])",
       "params[0].persist: expected true or false, got integer"},
      {"unknown param in module", R"("params": [{"id": 0, "numel": 1}],
         "modules": [{"id": 0, "params": [0, 9]}], "steps": [])",
       "modules[0].params[1]: unknown param 9"},
      {"param twice in module", R"("params": [{"id": 0, "numel": 1}],
         "modules": [{"id": 0, "params": [0, 0]}], "steps": [])",
       "modules[0].params[1]: param 0 listed twice"},
      {"duplicate module",
       R"("params": [], "modules": [{"id": 2}, {"id": 2}], "steps": [])",
       "modules[1].id: duplicate module id 2 (also modules[0])"},
      {"unknown parent",
       R"("params": [], "modules": [{"id": 0, "parent": 4}], "steps": [])",
       "modules[0].parent: unknown module 4"},
      {"own parent",
       R"("params": [], "modules": [{"id": 0, "parent": 0}], "steps": [])",
       "modules[0].parent: a module cannot be its own parent"},
      {"parent cycle", R"("params": [], "modules": [{"id": 0, "parent": 1},
                                                    {"id": 1, "parent": 0}], "steps": [])",
       "modules[0].parent: the parent chain of module 0 is a cycle"},
      {"steps not arrays", kPM + R"("steps": [{}])",
       "steps[0]: expected an array of events, got object"},
      {"unknown module",
       kPM + R"("steps": [[], [{"op": "fetch", "module": 42}]])",
       "steps[1][0].module: unknown module 42"},
      {"unknown op", kPM + R"("steps": [[{"op": "gather", "module": 0}]])",
       "steps[0][0].op: unknown op 'gather' (use fetch, release or hint)"},
      {"flag on hint", kPM + R"("steps": [[{"op": "hint", "module": 0, "forward": true}]])",
       "steps[0][0].forward: not valid on a hint event (it takes only 'module')"},
      {"hint of unknown module", kPM + R"("steps": [[{"op": "hint", "module": 9}]])",
       "steps[0][0].module: unknown module 9"},
      {"event key typo", kPM + R"("steps": [[{"op": "fetch", "modul": 0}]])",
       "steps[0][0].modul: unknown key (did you mean 'module'?)"},
      {"backward on fetch",
       kPM + R"("steps": [[{"op": "fetch", "module": 0, "backward": true},
                                                {"op": "release", "module": 0}]])",
       "steps[0][0].backward: not valid on a fetch event (it takes 'forward')"},
      {"forward on release", kPM + R"("steps": [[{"op": "fetch", "module": 0},
                                           {"op": "release", "module": 0, "forward": true}]])",
       "steps[0][1].forward: not valid on a release event (it takes "
       "'backward')"},
      {"release unfetched",
       kPM + R"("steps": [[{"op": "release", "module": 1}]])",
       "steps[0][0]: release of module 1 (b), which is not fetched at this "
       "point of step 0"},
      {"release twice", kPM + R"("steps": [[{"op": "fetch", "module": 0},
                                            {"op": "release", "module": 0},
                                            {"op": "release", "module": 0}]])",
       "steps[0][2]: release of module 0 (a), which is not fetched"},
      {"fetched in another step",
       kPM + R"("steps": [[{"op": "fetch", "module": 0}],
                                                     [{"op": "release", "module": 0}]])",
       "steps[1][0]: release of module 0 (a), which is not fetched at this "
       "point of step 1"},
      {"never released", kPM + R"("steps": [[{"op": "fetch", "module": 1},
                                             {"op": "fetch", "module": 0},
                                             {"op": "release", "module": 0}]])",
       "steps[0][0]: module 1 (b) is fetched here and never released in step "
       "0"},
      {"config null",
       R"("params": [], "modules": [], "steps": [], "config": {"a.b": null})",
       "config.a.b: null is not a config value"},
      {"config not object",
       R"("params": [], "modules": [], "steps": [], "config": [])",
       "config: expected an object, got array"},
      {"config twice", R"("params": [], "modules": [], "steps": [],
                          "config": {"io.depth": 1, "io": {"depth": 2}})",
       "'io.depth' is given twice"},
      {"repeated json key", R"("params": [{"id": 0, "numel": 1, "numel": 2}],
                               "modules": [], "steps": [])",
       "params[0].numel: key given twice in the same object"},
      {"repeated key deep",
       kPM + R"("steps": [[], [{"op": "fetch", "module": 0},
                                  {"op": "release", "op": "release", "module": 0}]])",
       "steps[1][1].op: key given twice in the same object"},
  };
  for (const BadTrace& c : cases) {
    Result<TraceFile> t = ParseTrace(Wrap(c.body), "x.json");
    ASSERT_FALSE(t.ok()) << c.what;
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(c.expected))
        << c.what;
  }
}

TEST(TraceValidation, Format) {
  Result<TraceFile> t = ParseTrace(
      R"({"format": "ztier-trace-v2", "params": [], "modules": [], "steps": []})",
      "f.json");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(
      std::string(t.status().message()),
      HasSubstr(
          "f.json: format: unknown format 'ztier-trace-v2' (this reader knows "
          "'ztier-trace-v1')"));
  t = ParseTrace(R"({"params": [], "modules": [], "steps": []})", "f.json");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("format: missing (required)"));
  t = ParseTrace("[1, 2]", "f.json");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("expected an object, got array"));
  t = ParseTrace("", "f.json");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("not valid JSON"));
}

TEST(TraceValidation, ManyErrorsAreCutShort) {
  std::string params;
  for (int i = 0; i < 30; ++i) {
    params += (i ? ", " : "") + std::string("{\"id\": ") + std::to_string(i) +
              ", \"numel\": 0}";
  }
  Result<TraceFile> t = ParseTrace(
      Wrap("\"params\": [" + params + "], \"modules\": [], \"steps\": []"),
      "m");
  ASSERT_FALSE(t.ok());
  std::string msg(t.status().message());
  EXPECT_THAT(msg, HasSubstr("params[19].numel"));
  EXPECT_THAT(msg, ::testing::Not(HasSubstr("params[20].numel")));
  EXPECT_THAT(msg, HasSubstr("... and 10 more errors"));
}

TEST(TraceValidation, ParentsMayComeLater) {
  Result<TraceFile> t = ParseTrace(
      Wrap(
          R"("params": [], "modules": [{"id": 5, "parent": 9}, {"id": 9}], "steps": [])"),
      "x");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->modules[0].parent, std::optional<uint64_t>(9));
}

// ---------------------------------------------------------------------------
// Model shapes.

TEST(ModelShapeFile, LoadsEveryKey) {
  ModelShape s = LoadShapeOrDie("llama2-70b");
  EXPECT_EQ(s.name, "llama2-70b");
  EXPECT_EQ(s.family, "llama");
  EXPECT_EQ(s.layers, 80u);
  EXPECT_EQ(s.hidden, 8192u);
  EXPECT_EQ(s.heads, 64u);
  EXPECT_EQ(s.kv_heads, 8u);
  EXPECT_EQ(s.vocab, 32000u);
  EXPECT_EQ(s.ffn_hidden, 28672u);
  EXPECT_EQ(s.seq_len, 4096u);
  EXPECT_EQ(s.batch, 1u);
  EXPECT_FALSE(s.tied_embeddings);

  ModelShape m = LoadShapeOrDie("moe-small");
  EXPECT_EQ(m.family, "moe");
  EXPECT_EQ(m.experts, 8u);
  EXPECT_EQ(m.moe_every, 2u);
  EXPECT_TRUE(m.tied_embeddings);
}

struct BadShape {
  const char* what;
  const char* yaml;
  const char* expected;
};

TEST(ModelShapeFile, Errors) {
  const char* kBase =
      "family: gpt2\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n";
  const BadShape cases[] = {
      {"typo", "family: gpt2\nlayers: 2\nhiden: 64\nheads: 4\nvocab: 256\n",
       "s.yaml:3:1: hiden: unknown key (did you mean 'hidden'?)"},
      {"missing", "family: gpt2\nlayers: 2\nheads: 4\nvocab: 256\n",
       "hidden: missing (required)"},
      {"family", "family: bert\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n",
       "s.yaml:1:1: family: unknown family 'bert' (use gpt2, llama or moe)"},
      {"number",
       "family: gpt2\nlayers: two\nhidden: 64\nheads: 4\nvocab: 256\n",
       "s.yaml:2:9: layers:"},
      {"zero", "family: gpt2\nlayers: 0\nhidden: 64\nheads: 4\nvocab: 256\n",
       "s.yaml:2:1: layers: must be at least 1"},
      {"heads", "family: gpt2\nlayers: 2\nhidden: 64\nheads: 5\nvocab: 256\n",
       "heads: hidden (64) is not a multiple of heads (5)"},
      {"kv_heads on gpt2",
       "family: gpt2\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n"
       "kv_heads: 2\n",
       "kv_heads: only the llama family has grouped-query attention"},
      {"kv_heads divides",
       "family: llama\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n"
       "kv_heads: 3\n",
       "kv_heads: heads (4) is not a multiple of kv_heads (3)"},
      {"experts on gpt2",
       "family: gpt2\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n"
       "experts: 4\n",
       "experts: only the moe family has experts"},
      {"moe_every on llama",
       "family: llama\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n"
       "moe_every: 2\n",
       "moe_every: only the moe family has MoE layers"},
      {"moe without experts",
       "family: moe\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n",
       "experts: an moe model needs at least 1 expert"},
      {"bool",
       "family: gpt2\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\n"
       "tied_embeddings: maybe\n",
       "s.yaml:6:18: tied_embeddings: expected true or false, got 'maybe'"},
      {"twice",
       "family: gpt2\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 256\nlayers: 3\n",
       "s.yaml:6:1: layers: given twice"},
      {"list", "family: gpt2\nlayers: [2]\nhidden: 64\nheads: 4\nvocab: 256\n",
       "layers: expected a single value"},
      {"not a map", "- gpt2\n", "expected a mapping of shape keys"},
      {"syntax", "family: gpt2\nlayers: [2\n", "not valid YAML"},
  };
  testing::ScratchDir dir;
  std::string path = dir.File("s.yaml");
  {
    std::ofstream(path) << kBase;
    Result<ModelShape> ok = LoadModelShape(path);
    ASSERT_TRUE(ok.ok()) << ok.status().ToString();
    EXPECT_EQ(ok->name, "s");  // the file's stem when `name` is absent
    EXPECT_EQ(ok->seq_len, 1024u);
  }
  for (const BadShape& c : cases) {
    std::ofstream(path, std::ios::trunc) << c.yaml;
    Result<ModelShape> s = LoadModelShape(path);
    ASSERT_FALSE(s.ok()) << c.what;
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(c.expected))
        << c.what;
  }
  Result<ModelShape> missing = LoadModelShape(dir.File("none.yaml"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------
// Parameter counts of the shipped shapes (elements; exact, and within 1% of
// the published sizes).

TEST(ModelShapes, ParameterCounts) {
  struct Count {
    const char* name;
    uint64_t exact;
    double published;
  };
  const Count counts[] = {
      {"gpt2-xl", 1'557'611'200ULL, 1.56e9},
      {"llama2-7b", 6'738'415'616ULL, 6.74e9},
      {"llama2-13b", 13'015'864'320ULL, 13.0e9},
      {"llama2-70b", 68'976'648'192ULL, 69.0e9},
  };
  for (const Count& c : counts) {
    TraceGenOptions o;
    o.steps = 1;
    TraceFile t = GenerateOrDie(LoadShapeOrDie(c.name), o);
    uint64_t n = TotalNumel(t);
    EXPECT_EQ(n, c.exact) << c.name;
    EXPECT_NEAR(static_cast<double>(n) / c.published, 1.0, 0.01) << c.name;
  }
}

TEST(ModelShapes, LlamaDefaultFfnAndGroupedQueryAttention) {
  ModelShape s;
  s.name = "l";
  s.family = "llama";
  s.layers = 1;
  s.hidden = 4096;
  s.heads = 32;
  s.vocab = 100;
  TraceFile t = GenerateOrDie(s);
  EXPECT_EQ(FindParam(t, "layers.0.mlp.gate_proj.weight")->numel,
            4096u * 11008u);
  EXPECT_EQ(FindParam(t, "layers.0.self_attn.k_proj.weight")->numel,
            4096u * 4096u);
  s.kv_heads = 8;
  t = GenerateOrDie(s);
  EXPECT_EQ(FindParam(t, "layers.0.self_attn.k_proj.weight")->numel,
            4096u * 1024u);
  EXPECT_EQ(FindParam(t, "layers.0.self_attn.q_proj.weight")->numel,
            4096u * 4096u);
}

// ---------------------------------------------------------------------------
// The generator.

// Checks the invariants every generated step must hold: each fetch is
// released later in the same step, releases close the most recent open
// fetch (hooks nest), and each leaf runs inside its parent's fetch.
void ExpectWellNested(const TraceFile& t) {
  std::map<uint64_t, const TraceModule*> by_id;
  for (const TraceModule& m : t.modules) by_id[m.id] = &m;
  for (size_t s = 0; s < t.steps.size(); ++s) {
    std::vector<uint64_t> open;
    for (size_t e = 0; e < t.steps[s].size(); ++e) {
      const TraceEvent& ev = t.steps[s][e];
      EXPECT_EQ(ev.backward, !ev.forward);
      if (ev.op == TraceOp::kFetch) {
        const TraceModule* m = by_id.at(ev.module);
        if (m->parent) {
          EXPECT_FALSE(open.empty());
          if (!open.empty()) {
            EXPECT_EQ(open.back(), *m->parent) << m->name;
          }
        } else {
          EXPECT_TRUE(open.empty());
        }
        open.push_back(ev.module);
      } else {
        ASSERT_FALSE(open.empty()) << "step " << s << " event " << e;
        EXPECT_EQ(open.back(), ev.module) << "step " << s << " event " << e;
        open.pop_back();
      }
    }
    EXPECT_TRUE(open.empty()) << "step " << s;
  }
}

// Modules with params, in the order a step fetches them with `forward`.
std::vector<uint64_t> LeafFetches(const TraceFile& t, size_t step,
                                  bool forward) {
  std::set<uint64_t> leaves;
  for (const TraceModule& m : t.modules) {
    if (!m.params.empty()) leaves.insert(m.id);
  }
  std::vector<uint64_t> out;
  for (const TraceEvent& e : t.steps[step]) {
    if (e.op == TraceOp::kFetch && e.forward == forward &&
        leaves.contains(e.module)) {
      out.push_back(e.module);
    }
  }
  return out;
}

TEST(GenerateTrace, Gpt2Structure) {
  TraceFile t = GenerateOrDie(LoadShapeOrDie("tiny"));
  EXPECT_EQ(t.model, "tiny");
  EXPECT_EQ(t.steps.size(), 3u);
  for (size_t i = 0; i < t.params.size(); ++i) EXPECT_EQ(t.params[i].id, i);
  for (size_t i = 0; i < t.modules.size(); ++i) EXPECT_EQ(t.modules[i].id, i);

  std::vector<std::string> names;
  for (const TraceModule& m : t.modules) names.push_back(m.name);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "model", "embed", "layers.0", "layers.0.ln_1",
                       "layers.0.attn", "layers.0.ln_2", "layers.0.mlp",
                       "layers.1", "layers.1.ln_1", "layers.1.attn",
                       "layers.1.ln_2", "layers.1.mlp", "ln_f", "lm_head"}));
  EXPECT_EQ(t.params[0].name, "wte.weight");
  EXPECT_EQ(t.params[0].numel, 256u * 64u);
  EXPECT_EQ(t.params[1].name, "wpe.weight");
  EXPECT_EQ(t.params[1].numel, 32u * 64u);
  EXPECT_EQ(FindParam(t, "layers.0.attn.c_attn.weight")->numel, 64u * 192u);
  EXPECT_EQ(FindParam(t, "layers.1.mlp.c_proj.weight")->numel, 256u * 64u);
  EXPECT_EQ(FindParam(t, "lm_head.weight"), nullptr);  // tied
  // The layer containers own no params; their parts do.
  EXPECT_TRUE(FindModule(t, "layers.0")->params.empty());
  EXPECT_EQ(FindModule(t, "layers.0.attn")->parent,
            FindModule(t, "layers.0")->id);
  EXPECT_EQ(FindModule(t, "layers.0")->parent, FindModule(t, "model")->id);
  EXPECT_EQ(TotalNumel(t),
            256u * 64 + 32 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64);

  // 2 FLOPs per element per token, plus the attention scores.
  const uint64_t tokens = 32;
  const TraceModule* attn = FindModule(t, "layers.0.attn");
  EXPECT_EQ(attn->flops,
            2 * (4 * 64 * 64 + 4 * 64) * tokens + 4 * 32 * 32 * 64);
  EXPECT_EQ(FindModule(t, "lm_head")->flops, 2u * 256 * 64 * tokens);
  EXPECT_EQ(FindModule(t, "embed")->flops, 0u);  // a lookup, no matmul
  ExpectWellNested(t);
}

TEST(GenerateTrace, TiedEmbeddingIsUsedByTwoModules) {
  TraceFile t = GenerateOrDie(LoadShapeOrDie("tiny"));
  const TraceParam* wte = FindParam(t, "wte.weight");
  ASSERT_NE(wte, nullptr);
  std::vector<std::string> users;
  for (const TraceModule& m : t.modules) {
    if (std::find(m.params.begin(), m.params.end(), wte->id) !=
        m.params.end()) {
      users.push_back(m.name);
    }
  }
  EXPECT_EQ(users, (std::vector<std::string>{"embed", "lm_head"}));
  // lm_head runs last in forward and first in backward.
  uint64_t head = FindModule(t, "lm_head")->id;
  std::vector<uint64_t> fwd = LeafFetches(t, 0, true);
  std::vector<uint64_t> bwd = LeafFetches(t, 0, false);
  EXPECT_EQ(fwd.back(), head);
  EXPECT_EQ(bwd.front(), head);

  ModelShape untied = LoadShapeOrDie("tiny");
  untied.tied_embeddings = false;
  TraceFile u = GenerateOrDie(untied);
  ASSERT_NE(FindParam(u, "lm_head.weight"), nullptr);
  EXPECT_EQ(TotalNumel(u), TotalNumel(t) + 256u * 64u);
}

TEST(GenerateTrace, ForwardInOrderThenBackwardInReverse) {
  for (const char* name : {"tiny", "llama-tiny", "moe-small"}) {
    TraceFile t = GenerateOrDie(LoadShapeOrDie(name));
    for (size_t s = 0; s < t.steps.size(); ++s) {
      std::vector<uint64_t> fwd = LeafFetches(t, s, true);
      std::vector<uint64_t> bwd = LeafFetches(t, s, false);
      std::reverse(bwd.begin(), bwd.end());
      EXPECT_EQ(fwd, bwd) << name << " step " << s;
      // Every forward event comes before every backward event.
      const auto& ev = t.steps[s];
      auto first_bwd = std::find_if(
          ev.begin(), ev.end(), [](const TraceEvent& e) { return !e.forward; });
      EXPECT_TRUE(std::all_of(first_bwd, ev.end(), [](const TraceEvent& e) {
        return !e.forward;
      })) << name;
      // Leaves fetch and release back to back.
      for (size_t e = 0; e < ev.size(); ++e) {
        if (ev[e].op == TraceOp::kFetch &&
            !t.modules[ev[e].module].params.empty()) {
          ASSERT_LT(e + 1, ev.size());
          EXPECT_EQ(ev[e + 1].op, TraceOp::kRelease);
          EXPECT_EQ(ev[e + 1].module, ev[e].module);
        }
      }
    }
    ExpectWellNested(t);
  }
}

TEST(GenerateTrace, LlamaStructure) {
  TraceFile t = GenerateOrDie(LoadShapeOrDie("llama-tiny"));
  std::vector<std::string> names;
  for (const TraceModule& m : t.modules) names.push_back(m.name);
  EXPECT_EQ(names,
            (std::vector<std::string>{
                "model", "embed_tokens", "layers.0", "layers.0.input_layernorm",
                "layers.0.self_attn", "layers.0.post_attention_layernorm",
                "layers.0.mlp", "layers.1", "layers.1.input_layernorm",
                "layers.1.self_attn", "layers.1.post_attention_layernorm",
                "layers.1.mlp", "norm", "lm_head"}));
  EXPECT_EQ(FindParam(t, "layers.0.mlp.down_proj.weight")->numel, 344u * 128u);
  EXPECT_EQ(FindParam(t, "lm_head.weight")->numel, 512u * 128u);
  EXPECT_EQ(
      TotalNumel(t),
      2u * 512 * 128 + 2 * (4 * 128 * 128 + 3 * 128 * 344 + 2 * 128) + 128);
  ExpectWellNested(t);
}

TEST(GenerateTrace, MoeStepsRouteToDifferentExperts) {
  ModelShape shape = LoadShapeOrDie("moe-small");
  TraceFile t = GenerateOrDie(shape);
  ASSERT_EQ(t.steps.size(), 3u);
  EXPECT_NE(t.steps[0], t.steps[1]);
  EXPECT_NE(t.steps[1], t.steps[2]);
  EXPECT_NE(t.steps[0], t.steps[2]);
  // MoE layers are layers.1 and layers.3: a router and 8 experts each, and
  // each step runs exactly 2 distinct experts of each in forward.
  EXPECT_EQ(FindModule(t, "layers.0.router"), nullptr);
  ASSERT_NE(FindModule(t, "layers.1.router"), nullptr);
  EXPECT_EQ(FindModule(t, "layers.1.mlp"), nullptr);
  ASSERT_NE(FindModule(t, "layers.3.experts.7"), nullptr);
  EXPECT_EQ(FindParam(t, "layers.1.router.weight")->numel, 256u * 8u);
  for (size_t s = 0; s < t.steps.size(); ++s) {
    std::map<std::string, std::set<std::string>> chosen;  // layer -> experts
    for (uint64_t m : LeafFetches(t, s, true)) {
      const std::string& n = t.modules[m].name;
      size_t at = n.find(".experts.");
      if (at != std::string::npos) chosen[n.substr(0, at)].insert(n);
    }
    ASSERT_EQ(chosen.size(), 2u) << "step " << s;
    for (const auto& [layer, experts] : chosen)
      EXPECT_EQ(experts.size(), 2u) << layer;
  }
  // An expert sees 2/8 of the tokens.
  const uint64_t tokens = 128;
  EXPECT_EQ(FindModule(t, "layers.1.experts.0")->flops,
            2 * (2 * 256 * 1024 + 1024 + 256) * tokens * 2 / 8);
  ExpectWellNested(t);

  // The seed names the routing.
  EXPECT_EQ(GenerateOrDie(shape), t);
  TraceGenOptions o;
  o.seed = 2;
  EXPECT_NE(GenerateOrDie(shape, o).steps, t.steps);
}

TEST(GenerateTrace, HintsNameTheChosenExpertsRightAfterTheRouter) {
  ModelShape shape = LoadShapeOrDie("moe-small");
  TraceGenOptions o;
  o.steps = 2;
  o.decode_steps = 1;
  o.checkpointing = true;
  const TraceFile plain = GenerateOrDie(shape, o);
  o.hints = true;
  const TraceFile hinted = GenerateOrDie(shape, o);
  ASSERT_EQ(hinted.steps.size(), plain.steps.size());
  for (size_t s = 0; s < hinted.steps.size(); ++s) {
    const std::vector<TraceEvent>& ev = hinted.steps[s];
    std::vector<TraceEvent> rest;  // the step without its hints
    size_t hints = 0;
    for (size_t k = 0; k < ev.size(); ++k) {
      if (ev[k].op != TraceOp::kHint) {
        rest.push_back(ev[k]);
        continue;
      }
      ++hints;
      // Each run of hints follows a router's release and names, in order,
      // the experts the layer fetches next.
      if (k == 0 || ev[k - 1].op == TraceOp::kHint) continue;
      ASSERT_EQ(ev[k - 1].op, TraceOp::kRelease);
      EXPECT_NE(hinted.modules[ev[k - 1].module].name.find(".router"), std::string::npos);
      std::vector<uint64_t> named, fetched;
      for (size_t j = k; j < ev.size() && ev[j].op == TraceOp::kHint; ++j)
        named.push_back(ev[j].module);
      for (size_t j = k + named.size(); j < ev.size() && fetched.size() < named.size(); ++j) {
        if (ev[j].op == TraceOp::kFetch) fetched.push_back(ev[j].module);
      }
      EXPECT_EQ(named, fetched) << "step " << s << " event " << k;
    }
    EXPECT_EQ(rest, plain.steps[s]) << "hints change nothing else, step " << s;
    // 2 MoE layers x top-2, in forward; a training step recomputes each
    // layer's forward (checkpointing), so its routers hint again.
    const bool training = s % 2 == 1;
    EXPECT_EQ(hints, training ? 8u : 4u) << "step " << s;
  }
  // The file keeps them.
  Result<TraceFile> back = ParseTrace(TraceToJson(hinted), "hinted");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, hinted);
  // A dense model has no router to hint after.
  Result<TraceFile> dense = GenerateTrace(LoadShapeOrDie("tiny"), o);
  ASSERT_FALSE(dense.ok());
  EXPECT_NE(dense.status().message().find("hints: family 'gpt2' has no router"),
            std::string::npos)
      << dense.status().ToString();
}

TEST(GenerateTrace, ScaleKeepsTheStructure) {
  for (const char* name : {"tiny", "llama2-7b", "moe-small"}) {
    ModelShape shape = LoadShapeOrDie(name);
    TraceGenOptions o;
    o.steps = 2;
    TraceFile full = GenerateOrDie(shape, o);
    o.scale = 1000;
    TraceFile scaled = GenerateOrDie(shape, o);
    EXPECT_EQ(scaled.steps, full.steps) << name;
    ASSERT_EQ(scaled.params.size(), full.params.size());
    ASSERT_EQ(scaled.modules.size(), full.modules.size());
    for (size_t i = 0; i < full.params.size(); ++i) {
      EXPECT_EQ(scaled.params[i].name, full.params[i].name);
      uint64_t want =
          std::max<uint64_t>(1, (full.params[i].numel + 999) / 1000);
      EXPECT_EQ(scaled.params[i].numel, want) << full.params[i].name;
    }
    for (size_t i = 0; i < full.modules.size(); ++i) {
      EXPECT_EQ(scaled.modules[i].name, full.modules[i].name);
      EXPECT_EQ(scaled.modules[i].params, full.modules[i].params);
      EXPECT_EQ(scaled.modules[i].parent, full.modules[i].parent);
      // FLOPs shrink with the data, keeping compute per byte.
      EXPECT_NEAR(static_cast<double>(scaled.modules[i].flops),
                  static_cast<double>(full.modules[i].flops) / 1000, 1.0);
    }
  }
}

TEST(GenerateTrace, CheckpointingRunsEachLayersForwardAgainInBackward) {
  ModelShape shape = LoadShapeOrDie("tiny");
  TraceFile plain = GenerateOrDie(shape);
  TraceGenOptions o;
  o.checkpointing = true;
  TraceFile ckpt = GenerateOrDie(shape, o);
  ExpectWellNested(ckpt);
  // Each layer: its fetch/release plus 4 children's: 10 more events.
  EXPECT_EQ(ckpt.steps[0].size(), plain.steps[0].size() + 2 * 10);

  // In backward, layers.1's forward modules run again, then its backward
  // modules in reverse, then layers.0's.
  const std::vector<TraceEvent>& ev = ckpt.steps[0];
  auto first_bwd = std::find_if(ev.begin(), ev.end(),
                                [](const TraceEvent& e) { return !e.forward; });
  std::vector<std::string>
      seq;  // "+name" forward fetch, "-name" backward fetch
  for (auto it = first_bwd; it != ev.end(); ++it) {
    const TraceModule& m = ckpt.modules[it->module];
    if (it->op == TraceOp::kFetch && !m.params.empty()) {
      seq.push_back((it->forward ? "+" : "-") + m.name);
    }
  }
  EXPECT_EQ(seq, (std::vector<std::string>{
                     "-lm_head", "-ln_f", "+layers.1.ln_1", "+layers.1.attn",
                     "+layers.1.ln_2", "+layers.1.mlp", "-layers.1.mlp",
                     "-layers.1.ln_2", "-layers.1.attn", "-layers.1.ln_1",
                     "+layers.0.ln_1", "+layers.0.attn", "+layers.0.ln_2",
                     "+layers.0.mlp", "-layers.0.mlp", "-layers.0.ln_2",
                     "-layers.0.attn", "-layers.0.ln_1", "-embed"}));
}

// The expert modules a step fetches in forward, by name.
std::vector<std::string> ExpertsOf(const TraceFile& t, size_t step) {
  std::vector<std::string> out;
  for (uint64_t m : LeafFetches(t, step, true)) {
    if (t.modules[m].name.find(".experts.") != std::string::npos)
      out.push_back(t.modules[m].name);
  }
  return out;
}

TEST(GenerateTrace, DecodeStepsAreForwardOnlyBeforeEachTrainingStep) {
  for (const char* name : {"tiny", "llama-tiny", "moe-small"}) {
    for (bool checkpointing : {false, true}) {
      TraceGenOptions o;
      o.steps = 3;
      o.decode_steps = 4;
      o.checkpointing = checkpointing;
      TraceFile t = GenerateOrDie(LoadShapeOrDie(name), o);
      ASSERT_EQ(t.steps.size(), 3u * 5u) << name;
      ExpectWellNested(t);  // every fetch is released, hooks nest
      for (size_t s = 0; s < t.steps.size(); ++s) {
        const std::vector<TraceEvent>& ev = t.steps[s];
        const bool training = s % 5 == 4;
        const bool any_backward =
            std::any_of(ev.begin(), ev.end(),
                        [](const TraceEvent& e) { return e.backward; });
        EXPECT_EQ(any_backward, training) << name << " step " << s;
        if (training) continue;
        // A decode step: each module once, fetched then released, forward
        // (no recomputation even with checkpointing).
        std::map<uint64_t, int> fetches;
        for (const TraceEvent& e : ev) {
          EXPECT_TRUE(e.forward) << name << " step " << s;
          fetches[e.module] += e.op == TraceOp::kFetch;
        }
        for (const auto& [m, n] : fetches)
          EXPECT_EQ(n, 1) << name << " step " << s << " module " << m;
        // The forward of a training step (an MoE one routes elsewhere, but
        // to as many experts).
        const std::vector<TraceEvent>& train = t.steps[s - s % 5 + 4];
        std::vector<TraceEvent> forward(
            train.begin(),
            std::find_if(train.begin(), train.end(),
                         [](const TraceEvent& e) { return e.backward; }));
        if (std::string(name) == "moe-small") {
          EXPECT_EQ(ev.size(), forward.size());
        } else {
          EXPECT_EQ(ev, forward) << name << " step " << s;
        }
      }
    }
  }
}

TEST(GenerateTrace, TrainingStepsDoNotChangeWithDecodeSteps) {
  for (const char* name : {"tiny", "llama-tiny", "moe-small"}) {
    for (bool checkpointing : {false, true}) {
      ModelShape shape = LoadShapeOrDie(name);
      TraceGenOptions o;
      o.steps = 3;
      o.checkpointing = checkpointing;
      TraceFile plain = GenerateOrDie(shape, o);
      o.decode_steps = 2;
      TraceFile rl = GenerateOrDie(shape, o);
      ASSERT_EQ(rl.steps.size(), 9u);
      EXPECT_EQ(rl.params, plain.params);
      EXPECT_EQ(rl.modules, plain.modules);
      for (size_t s = 0; s < 3; ++s)
        EXPECT_EQ(rl.steps[3 * s + 2], plain.steps[s]) << name << " step " << s;
    }
  }
}

TEST(GenerateTrace, MoeDecodeStepsRouteToTheirOwnExperts) {
  ModelShape shape = LoadShapeOrDie("moe-small");
  TraceGenOptions o;
  o.steps = 2;
  o.decode_steps = 3;
  TraceFile t = GenerateOrDie(shape, o);
  ASSERT_EQ(t.steps.size(), 8u);
  // Each step runs 2 experts in each of the 2 MoE layers; with 28 pairs per
  // layer, 8 steps of this seed all differ.
  std::set<std::vector<std::string>> routings;
  for (size_t s = 0; s < t.steps.size(); ++s) {
    EXPECT_EQ(ExpertsOf(t, s).size(), 4u) << "step " << s;
    routings.insert(ExpertsOf(t, s));
  }
  EXPECT_EQ(routings.size(), t.steps.size());
  EXPECT_NE(t.steps[0], t.steps[1]);
  EXPECT_NE(t.steps[0], t.steps[4]);  // the next training step's decode
  // The seed names the routing of decode steps too.
  EXPECT_EQ(GenerateOrDie(shape, o), t);
  o.seed = 2;
  TraceFile other = GenerateOrDie(shape, o);
  EXPECT_NE(other.steps[0], t.steps[0]);
}

TEST(GenerateTrace, RejectsTooManyDecodeSteps) {
  ModelShape shape = LoadShapeOrDie("tiny");
  TraceGenOptions o;
  o.steps = 1;
  o.decode_steps = kMaxDecodeSteps;
  Result<TraceFile> t = GenerateTrace(shape, o);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->steps.size(), kMaxDecodeSteps + 1u);

  o.decode_steps = kMaxDecodeSteps + 1;
  t = GenerateTrace(shape, o);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("decode_steps: 1001 is more than the limit of 1000"));

  // The total is checked in 64 bits: these would wrap in 32.
  o.steps = std::numeric_limits<uint32_t>::max();
  o.decode_steps = kMaxDecodeSteps;
  t = GenerateTrace(shape, o);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("steps x (decode_steps + 1) = 4294967295 x 1001 = "
                        "4299262262295 steps, more than the limit of 1000000"));
  o.steps = 1000;
  o.decode_steps = 1000;  // 1001000 steps
  t = GenerateTrace(shape, o);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("= 1001000 steps, more than the limit of 1000000"));
}

TEST(GenerateTrace, RejectsBadShapesAndOptions) {
  ModelShape shape = LoadShapeOrDie("tiny");
  TraceGenOptions o;
  o.scale = 0.5;
  Result<TraceFile> t = GenerateTrace(shape, o);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("scale"));
  o = {};
  o.steps = 0;
  EXPECT_FALSE(GenerateTrace(shape, o).ok());
  shape.family = "rnn";
  t = GenerateTrace(shape, {});
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("unknown family 'rnn'"));
}

// ---------------------------------------------------------------------------
// What configs/ ships.

TEST(ShippedConfigs, EveryModelShapeLoadsAndGenerates) {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(kSource + "/configs/models")) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    Result<ModelShape> s = LoadModelShape(e.path().string());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_EQ(s->name, e.path().stem().string());
    TraceGenOptions o;
    o.steps = 1;
    o.scale = 1e6;
    Result<TraceFile> t = GenerateTrace(*s, o);
    ASSERT_TRUE(t.ok()) << e.path() << ": " << t.status().ToString();
    ExpectWellNested(*t);
  }
  EXPECT_GE(n, 7u);
}

TEST(ShippedConfigs, EveryTraceLoads) {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(kSource + "/configs/traces")) {
    if (e.path().extension() != ".json") continue;
    ++n;
    Result<TraceFile> t = LoadTrace(e.path().string());
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    EXPECT_FALSE(t->steps.empty()) << e.path();
    ExpectWellNested(*t);
  }
  EXPECT_GE(n, 3u);
}

// The shipped traces are what the generator makes today with the commands
// in configs/traces/README.md; regenerate them when the generator changes.
TEST(ShippedConfigs, TracesMatchTheGenerator) {
  struct Shipped {
    const char* file;
    const char* model;
    double scale;
  };
  for (const Shipped& s : {Shipped{"gpt2_tied", "tiny", 1},
                           Shipped{"llama_small", "llama-tiny", 1},
                           Shipped{"moe_branch", "moe-small", 1}}) {
    Result<TraceFile> shipped =
        LoadTrace(kSource + "/configs/traces/" + s.file + ".json");
    ASSERT_TRUE(shipped.ok()) << shipped.status().ToString();
    TraceGenOptions o;
    o.steps = 3;
    o.scale = s.scale;
    EXPECT_EQ(*shipped, GenerateOrDie(LoadShapeOrDie(s.model), o)) << s.file;
  }
  Result<TraceFile> moe =
      LoadTrace(kSource + "/configs/traces/moe_branch.json");
  ASSERT_TRUE(moe.ok());
  EXPECT_NE(moe->steps[0], moe->steps[1]);
}

}  // namespace
}  // namespace ztier::coordinator
