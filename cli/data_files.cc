#include "cli/data_files.h"

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <fmt/ranges.h>

// Set by cli/CMakeLists.txt; the fallbacks keep the file compilable alone.
#ifndef ZTIER_CLI_DATA_FROM_BIN
#define ZTIER_CLI_DATA_FROM_BIN "../share/ztier"
#endif
#ifndef ZTIER_SOURCE_DIR
#define ZTIER_SOURCE_DIR ""
#endif

namespace ztier::cli {

namespace fs = std::filesystem;

namespace {

// The installed data folder, from the executable's real path (a symlink to
// it in ~/bin still finds the prefix it was installed into). Empty when
// /proc/self/exe cannot be read.
std::string InstalledDataRoot() {
  std::error_code ec;
  const fs::path exe = fs::canonical("/proc/self/exe", ec);
  if (ec) return {};
  return (exe.parent_path() / ZTIER_CLI_DATA_FROM_BIN).lexically_normal().string();
}

// Names (file stems) of the `ext` files in `dir`.
void CollectNames(const fs::path& dir, std::string_view ext, std::vector<std::string>* names) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ext) names->push_back(e.path().stem().string());
  }
}

std::string JoinOrNone(const std::vector<std::string>& items, std::string_view none) {
  return items.empty() ? std::string(none) : fmt::format("{}", fmt::join(items, "; "));
}

}  // namespace

std::vector<std::string> DataRoots() {
  std::vector<std::string> roots;
  if (std::string installed = InstalledDataRoot(); !installed.empty()) {
    roots.push_back(std::move(installed));
  }
  std::error_code ec;
  const fs::path cwd = fs::current_path(ec);
  roots.push_back(ec ? std::string(".") : cwd.string());
  if (std::string_view(ZTIER_SOURCE_DIR).size() > 0) roots.emplace_back(ZTIER_SOURCE_DIR);
  // The working directory is often the source tree (or the prefix): look
  // there once.
  std::vector<std::string> unique, keys;
  for (std::string& r : roots) {
    std::string key = fs::weakly_canonical(r, ec).string();
    if (std::find(keys.begin(), keys.end(), key) != keys.end()) continue;
    keys.push_back(std::move(key));
    unique.push_back(std::move(r));
  }
  return unique;
}

Result<std::string> ResolveDataFile(std::string_view what, std::string_view subdir,
                                    std::string_view name, std::string_view ext) {
  std::error_code ec;
  const std::string n(name);
  // Any existing path that is not a folder is taken as given: a regular
  // file, but also a pipe (`--config <(...)`) or a device.
  if (fs::exists(n, ec) && !fs::is_directory(n, ec)) return n;
  const std::string file = n + std::string(ext);
  std::vector<std::string> looked;  // "<dir> (why not)"
  std::vector<std::string> names;
  for (const std::string& root : DataRoots()) {
    const fs::path dir = fs::path(root) / subdir;
    if (!fs::is_directory(dir, ec)) {
      looked.push_back(fmt::format("{} (no such folder)", dir.string()));
      continue;
    }
    const fs::path p = dir / file;
    if (fs::is_regular_file(p, ec)) return p.string();
    looked.push_back(fmt::format("{} (no {})", dir.string(), file));
    CollectNames(dir, ext, &names);
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return Status::NotFound(fmt::format(
      "{} '{}' is neither a file nor a name in {}/; looked in: {}; known names: {}. Give a "
      "path, or one of the known names (an installed ztier keeps them in "
      "<prefix>/share/ztier/{})",
      what, n, subdir, JoinOrNone(looked, "nowhere"),
      names.empty() ? std::string("none found") : fmt::format("{}", fmt::join(names, ", ")),
      subdir));
}

Result<std::string> ResolveModelPath(std::string_view model) {
  return ResolveDataFile("model", "configs/models", model, ".yaml");
}

Result<std::string> ResolveTracePath(std::string_view trace) {
  return ResolveDataFile("trace", "configs/traces", trace, ".json");
}

Result<std::string> ResolveConfigPath(std::string_view config) {
  return ResolveDataFile("config", "configs", config, ".yaml");
}

}  // namespace ztier::cli
