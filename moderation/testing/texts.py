"""Texts for tests and benchmarks of term matching: scam / abuse terms in zh and en, generated written variants of
each evasion kind, and a benign zh / en set that must match none of them."""
from __future__ import annotations

import random

ZH_TERMS = ["赌博", "稳赚不赔", "加微信", "内部消息", "日入过万", "免费领取", "私信我", "代孕", "裸聊", "毒品交易",
            "网络兼职", "刷单返利", "高额回报", "贷款秒批", "办理证件"]
EN_TERMS = ["free money", "scam", "crypto giveaway", "click the link", "send bitcoin", "wire transfer now",
            "hate you", "kill yourself", "guaranteed profit", "work from home"]
BENIGN = ["今天天气很好，我们去公园散步吧", "早安，来杯咖啡", "岁月静好", "周一早上的我，全靠这杯续命",
          "我的猫又在审视我", "周末和朋友一起吃火锅", "这家店的面包真好吃", "新年快乐，万事如意",
          "他在图书馆学习了一整天", "下雨了，记得带伞", "我们在海边看日落", "孩子们在操场上踢足球",
          "妈妈做的红烧肉最好吃", "这本书讲的是宇宙的历史", "博物馆里的恐龙化石", "我在学习如何做蛋糕",
          "春天的花开得很美", "地铁今天很拥挤", "明天要交作业了", "老师表扬了我们班",
          "Launch day! So proud of the team", "My cat judging me again", "Houston we have a problem",
          "When the code works on the first try", "Me leaving the meeting that could have been an email",
          "I love scampi and fresh bread", "The escambia river at dawn", "Free time is the best time",
          "Our money jar for the holidays", "A giveaway of homemade cookies for the neighbours",
          "Click here to see my holiday photos", "Working from the garden today", "The link between sleep and mood",
          "She hates Mondays", "We will kill it at the concert tonight", "Sending love to everyone",
          "The wire was loose, fixed it", "Profit and loss explained for beginners", "Crypto is confusing",
          "Bitcoin price charts are wild"]


def homophone_pool() -> dict[str, list[str]]:
    """Common characters grouped by toneless pinyin, to write a term with other characters of the same sound."""
    from pypinyin import lazy_pinyin

    pool = ("的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出要于就下得可你年生自会"
            "那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进"
            "种将还分此心前面又定见只主没公从知样手长现明问力理尔点文几它已口身手才由比员代全光最"
            "打被象走加伯吻堵读独睹渡杜度肚妒镀都毒赌博搏泊驳薄勃帛舶脖钵菠播拨波玻剥")
    by_sound: dict[str, list[str]] = {}
    for ch in pool:
        by_sound.setdefault(lazy_pinyin(ch)[0], []).append(ch)
    return by_sound


def variants(term: str, rng: random.Random, sounds: dict) -> dict[str, str]:
    """One written variant of `term` per kind that applies to it."""
    from opencc import OpenCC
    from pypinyin import lazy_pinyin

    out = {"separator": rng.choice([" ", ".", "💰", "\u200b", "-"]).join(term)}
    full = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in term)
    trad = OpenCC("s2t").convert(term)
    out["normalized"] = trad if trad != term else full
    if all("\u4e00" <= c <= "\u9fff" for c in term):
        i = rng.randrange(len(term))
        same = [c for c in sounds.get(lazy_pinyin(term[i])[0], []) if c != term[i]]
        if same:
            out["homophone"] = term[:i] + rng.choice(same) + term[i + 1:]
        out["pinyin"] = term[:i] + lazy_pinyin(term[i])[0] + term[i + 1:]
        out["letter"] = term[:i] + lazy_pinyin(term[i])[0][0].upper() + term[i + 1:]
    else:
        leet = {"a": "4", "e": "3", "o": "0", "s": "$", "i": "1", "t": "7"}
        out["leetspeak"] = "".join(leet.get(c, c) if c in leet and rng.random() < 0.6 else c for c in term)
        if out["leetspeak"] == term:
            out["leetspeak"] = term.replace("e", "3", 1) if "e" in term else term.replace("o", "0", 1)
    return out
