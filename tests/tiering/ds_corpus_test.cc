// Whole DeepSpeed configs against what the import must make of them. Each
// tests/data/deepspeed/NAME.json has beside it NAME.report (the notes, the
// keys not mapped and what --strict says, or the error) and, when it
// imports, NAME.yaml (the ztier config). A mismatch prints a line diff.
// ZTIER_UPDATE_CORPUS=1 rewrites the expected files from the current output,
// to be reviewed in the commit like any other change.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tiering/config.h"
#include "tiering/ds_import.h"

namespace ztier::tiering {
namespace {

namespace fs = std::filesystem;

const fs::path kCorpus = fs::path(ZTIER_SOURCE_DIR) / "tests/data/deepspeed";

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

// Each line prefixed with `tag`, so the report says what every line is.
void Tagged(std::string* out, std::string_view tag, const std::string& text) {
  for (const std::string& l : Lines(text)) *out += std::string(tag) + l + "\n";
}

// What the import says about `json`, laxly and with --strict.
std::string Report(const std::string& json, std::string* yaml) {
  std::string out;
  Result<ImportResult> lax = ImportDeepSpeedJson(json);
  if (!lax.ok()) {
    Tagged(&out, "error: ", std::string(lax.status().message()));
    return out;
  }
  *yaml = ConfigToYaml(lax->config);
  for (const std::string& n : lax->notes) out += "note: " + n + "\n";
  for (const std::string& k : lax->unmapped_keys)
    out += "not mapped: " + k + "\n";
  Result<ImportResult> strict =
      ImportDeepSpeedJson(json, ImportOptions{.strict = true});
  if (strict.ok()) {
    out += "strict: ok\n";
  } else {
    Tagged(&out, "strict: ", std::string(strict.status().message()));
  }
  return out;
}

// A line diff (longest common subsequence): "-" expected, "+" actual.
std::string Diff(const std::string& expected, const std::string& actual) {
  std::vector<std::string> a = Lines(expected), b = Lines(actual);
  std::vector<std::vector<size_t>> lcs(a.size() + 1,
                                       std::vector<size_t>(b.size() + 1, 0));
  for (size_t i = a.size(); i-- > 0;)
    for (size_t j = b.size(); j-- > 0;)
      lcs[i][j] = a[i] == b[j] ? lcs[i + 1][j + 1] + 1
                               : std::max(lcs[i + 1][j], lcs[i][j + 1]);
  std::string d;
  size_t i = 0, j = 0;
  while (i < a.size() || j < b.size()) {
    if (i < a.size() && j < b.size() && a[i] == b[j]) {
      ++i, ++j;
    } else if (i < a.size() &&
               (j == b.size() || lcs[i + 1][j] >= lcs[i][j + 1])) {
      d += "- " + a[i++] + "\n";
    } else {
      d += "+ " + b[j++] + "\n";
    }
  }
  return d;
}

void Expect(const fs::path& file, const std::string& actual) {
  if (std::getenv("ZTIER_UPDATE_CORPUS") != nullptr) {
    std::ofstream(file, std::ios::binary) << actual;
    return;
  }
  ASSERT_TRUE(fs::exists(file))
      << file << " is missing (ZTIER_UPDATE_CORPUS=1 writes it)";
  const std::string expected = ReadFile(file);
  EXPECT_TRUE(expected == actual)
      << file.filename().string() << " differs (- expected, + actual):\n"
      << Diff(expected, actual);
}

std::vector<fs::path> CorpusFiles() {
  std::vector<fs::path> files;
  for (const fs::directory_entry& e : fs::directory_iterator(kCorpus))
    if (e.path().extension() == ".json") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

TEST(DsCorpus, EveryConfigImportsAsExpected) {
  std::vector<fs::path> files = CorpusFiles();
  ASSERT_GE(files.size(), 9u) << kCorpus;
  for (const fs::path& json : files) {
    SCOPED_TRACE(json.filename().string());
    std::string yaml;
    std::string report = Report(ReadFile(json), &yaml);
    fs::path base = json;
    Expect(base.replace_extension(".report"), report);
    if (yaml.empty()) {
      EXPECT_FALSE(fs::exists(base.replace_extension(".yaml")))
          << "the config does not import, yet a .yaml is expected";
    } else {
      Expect(base.replace_extension(".yaml"), yaml);
      // What the import writes is a config ztier loads back unchanged.
      Result<Config> back = LoadConfigText(yaml, base.filename().string(),
                                           LoadOptions{.check_paths = false});
      EXPECT_TRUE(back.ok()) << back.status().ToString();
    }
  }
}

TEST(DsCorpus, DiffShowsWhatChanged) {
  EXPECT_EQ(Diff("a\nb\nc\n", "a\nx\nc\n"), "- b\n+ x\n");
  EXPECT_EQ(Diff("a\n", "a\n"), "");
}

}  // namespace
}  // namespace ztier::tiering
